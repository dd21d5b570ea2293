"""Prometheus metrics: the counters and histograms every orgsync process records, and their files.

Web (granian) and worker (Celery prefork) processes each count in their own memory-mapped
file under ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode); ``/metrics``
sums the files of every process, dead ones included, so a counter never goes down because a
process restarted. orgsync sets that directory for the processes it starts when the operator
has not (``prepare_multiprocess_dir``), and removes the files of processes that no longer run
when it starts, so the directory does not grow with every restart.

Each file is named after its process as ``<host>-<pid>`` rather than the bare pid: processes of
several containers may share one directory (a volume), and their pids repeat.

Instruments are built on first use, not at import: whether values go to files or stay in
memory is decided from the environment at that moment, and a process must be able to import
this module before its parent process (``orgsync run``, ``serve``, ``worker``) set the
variable. Recording costs a dictionary lookup and one locked write to a mapped page: cheap
enough for the intake path, which records one counter per request and nothing else.

Gauges of the current state (inbox depth, oldest pending age, commands by status,
reconciliation, stopped rules, notifications) are read from the database when scraped, by
``models.metrics_db``: they need no recording and agree across processes by construction.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.multiprocess import mark_process_dead

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Receive-to-apply lag, seconds: from the intake's commit to the apply's, the mirror's freshness.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The reasons of orgsync_events_skipped: a write that lost to a newer version, a row already handled.
STALE = "stale"
DUPLICATE = "duplicate"
SKIP_REASONS = (STALE, DUPLICATE)
# Label values come from bounded sets (codes, statuses, table names); anything else is cut.
_LABEL_CHARS = 40
_LABEL_RE = re.compile(r"[^A-Za-z0-9_.-]+")
_HOST = _LABEL_RE.sub("-", socket.gethostname()).replace("_", "-") or "host"


def process_identifier() -> str:
    """This process's name in file names: host and pid, with no '_' (the files' separator)."""
    return f"{_HOST}-{os.getpid()}"


def multiprocess_dir() -> Path | None:
    raw = os.environ.get(MULTIPROC_ENV, "").strip()
    return Path(raw) if raw else None


@dataclass(frozen=True)
class Instruments:
    deliveries: Counter
    events_applied: Counter
    events_dead: Counter
    apply_lag: Histogram
    events_skipped: Counter
    api_calls: Counter
    rate_limit_waits: Counter
    rate_limit_wait_seconds: Histogram
    registry: CollectorRegistry


@cache
def instruments() -> Instruments:
    """The process's instruments, built once; in files when ``PROMETHEUS_MULTIPROC_DIR`` is set."""
    if multiprocess_dir() is not None:
        values.ValueClass = values.MultiProcessValue(process_identifier)  # type: ignore[no-untyped-call]
    else:
        values.ValueClass = values.MutexValue
    # A registry of our own: in multiprocess mode it is never collected (the files are), and
    # in one process it keeps orgsync's metrics apart from anything else in the global one.
    registry = CollectorRegistry(auto_describe=True)
    found = Instruments(
        deliveries=Counter(
            "orgsync_webhook_deliveries",
            "Webhook deliveries answered, by outcome (accepted, duplicate, ignored, rejected, refused, "
            "too_large, unavailable) and reason (the refusal or rejection code).",
            ["outcome", "reason"],
            registry=registry,
        ),
        events_applied=Counter(
            "orgsync_events_applied", "Inbox events applied to the mirror.", registry=registry
        ),
        events_dead=Counter(
            "orgsync_events_dead",
            "Inbox events given up on after their last attempt (status dead).",
            registry=registry,
        ),
        apply_lag=Histogram(
            "orgsync_apply_lag_seconds",
            "Time from a delivery's receipt to the transaction that applied it.",
            buckets=LAG_BUCKETS,
            registry=registry,
        ),
        events_skipped=Counter(
            "orgsync_events_skipped",
            "Inbox events that changed nothing, by reason. stale: applied (so also counted in "
            "orgsync_events_applied), but the row the event is about (a membership event's "
            "membership, not the organization data it embeds) already held an equal or newer "
            "version, in the mirror or from another event of the same batch; deletions of "
            "organizations, roles, permissions, users and domains apply whatever their version and "
            "are never stale. duplicate: the inbox row was already handled when a task came to it "
            "(a redelivered or repeated task, or a row another task's batch took), so nothing was "
            "done for it again.",
            ["reason"],
            registry=registry,
        ),
        api_calls=Counter(
            "orgsync_clerk_api_calls",
            "Backend API calls made, by HTTP status ('none' when no response came) and purpose.",
            ["status", "purpose"],
            registry=registry,
        ),
        rate_limit_waits=Counter(
            "orgsync_clerk_rate_limit_waits",
            "Backend API calls that waited for a rate-limit slot (or a 429's Retry-After).",
            registry=registry,
        ),
        rate_limit_wait_seconds=Histogram(
            "orgsync_clerk_rate_limit_wait_seconds",
            "How long calls that waited for a rate-limit slot waited.",
            buckets=WAIT_BUCKETS,
            registry=registry,
        ),
        registry=registry,
    )
    # Both reasons exported from the start, at 0: a rate over a series that appears late is wrong.
    for reason in SKIP_REASONS:
        found.events_skipped.labels(reason)
    return found


def label(value: str | None) -> str:
    """A bounded label value: the code before any ':' detail, safe characters only."""
    if not value:
        return ""
    head = value.split(":", 1)[0].strip()
    return _LABEL_RE.sub("_", head)[:_LABEL_CHARS]


# -- recording (each one is a few microseconds; none touches the database) ---------------------


# The intake path's counters by (outcome, reason code), found once: a lookup, not labels().
_delivery_counters: dict[tuple[str, str], Any] = {}


def delivery(outcome: str, reason: str | None = None) -> None:
    key = (outcome, label(reason) if reason else "")
    counter = _delivery_counters.get(key)
    if counter is None:
        counter = _delivery_counters[key] = instruments().deliveries.labels(*key)
    counter.inc()


def applied(lags_s: Iterable[float]) -> None:
    """Events applied in one committed transaction, with each one's receive-to-apply lag."""
    found = instruments()
    count = 0
    for lag in lags_s:
        found.apply_lag.observe(max(0.0, lag))
        count += 1
    if count:
        found.events_applied.inc(count)


def dead(count: int) -> None:
    if count > 0:
        instruments().events_dead.inc(count)


def stale(count: int) -> None:
    """Events applied in one committed transaction whose primary write changed nothing."""
    if count > 0:
        instruments().events_skipped.labels(STALE).inc(count)


def duplicates(count: int) -> None:
    """Inbox rows a task was given that were already handled (not pending) when it got to them."""
    if count > 0:
        instruments().events_skipped.labels(DUPLICATE).inc(count)


def api_call(status: int | None, purpose: str) -> None:
    instruments().api_calls.labels(str(status) if status is not None else "none", label(purpose)).inc()


def rate_limit_wait(seconds: float) -> None:
    if seconds > 0:
        found = instruments()
        found.rate_limit_waits.inc()
        found.rate_limit_wait_seconds.observe(seconds)


# -- the files of several processes ------------------------------------------------------------


def prepare_multiprocess_dir(environ: MutableMapping[str, str], default: Path) -> Path:
    """Choose the directory for this process and its children, and clear what dead processes left.

    The operator's ``PROMETHEUS_MULTIPROC_DIR`` wins; else ``default`` is set in ``environ`` (so
    children inherit it). Files of processes of this host that no longer run are removed: at
    the start of ``orgsync run`` that is all of them, while a process already running beside
    (a ``worker`` started on its own, sharing the directory) keeps its counts.
    """
    raw = environ.get(MULTIPROC_ENV, "").strip()
    directory = Path(raw) if raw else default
    directory.mkdir(parents=True, exist_ok=True)
    environ[MULTIPROC_ENV] = str(directory.absolute())
    removed = remove_dead_files(directory)
    if removed:
        log.debug("removed %d metrics files of processes no longer running", removed)
    return directory


def remove_dead_files(directory: Path, *, alive: Callable[[int], bool] | None = None) -> int:
    """Remove the metric files of this host's processes that are gone; returns how many."""
    removed = 0
    for path in directory.glob("*.db"):
        if _gone_owner(path, alive or _pid_alive) is not None:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
    return removed


def _gone_owner(path: Path, alive: Callable[[int], bool]) -> str | None:
    """The ``<host>-<pid>`` a metrics file is named after, when that process of this host is gone."""
    owner = path.stem.rsplit("_", 1)[-1]
    prefix = f"{_HOST}-"
    pid = owner[len(prefix) :] if owner.startswith(prefix) else ""
    return owner if pid.isdigit() and not alive(int(pid)) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_dead_gauges(*, alive: Callable[[int], bool] | None = None) -> int:
    """Drop the live gauges of this host's processes that are gone; returns how many processes.

    The web server calls it as each worker starts (one that died is replaced by a new one) and
    once its workers have stopped; their counters stay, so totals never go down.
    """
    directory = multiprocess_dir()
    if directory is None:
        return 0
    gone = {
        owner
        for path in directory.glob("gauge_live*.db")
        if (owner := _gone_owner(path, alive or _pid_alive)) is not None
    }
    for owner in gone:
        mark_process_dead(owner, str(directory))  # type: ignore[no-untyped-call]
    return len(gone)


def mark_dead(pid: int | None = None) -> None:
    """A process ended: drop its live gauges (its counters stay, so totals never go down).

    Called by each Celery pool process as it shuts down.
    """
    directory = multiprocess_dir()
    if directory is None:
        return
    identifier = f"{_HOST}-{pid}" if pid is not None else process_identifier()
    mark_process_dead(identifier, str(directory))  # type: ignore[no-untyped-call]
