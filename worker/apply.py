"""Apply pending inbox rows to the mirror: whole batches first, then isolate poison, retry or dead-letter."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import metrics
from models.db import session_scope
from models.errors import PayloadError, RetryableError
from models.events import Event, parse_event
from models.inbox import due_pending_ids
from models.mirror import apply_events, lock_for_events
from models.reconcile import unseen_organizations
from models.redact import describe_error, redact
from models.tables import InboxEvent, InboxStatus

log = logging.getLogger(__name__)

BACKOFF_BASE_MS = 2_000
# Well below the Redis visibility timeout set in worker.app: a countdown longer than that would
# have the broker hand the retry to a second worker before its time.
BACKOFF_CAP_MS = 600_000
MAX_ERROR_CHARS = 500

_TABLE = cast(Table, InboxEvent.__table__)

# Core executemany: one statement, different values per row, no ORM identity map involved.
_MARK_REJECTED = (
    _TABLE.update()
    .where(_TABLE.c.id == bindparam("row_id"))
    .values(
        status=InboxStatus.REJECTED,
        last_error=bindparam("error"),
        handled_at=bindparam("now"),
        next_attempt_at=None,
    )
)
_MARK_FAILED = (
    _TABLE.update()
    .where(_TABLE.c.id == bindparam("row_id"))
    .values(
        status=bindparam("new_status"),
        attempts=bindparam("new_attempts"),
        last_error=bindparam("error"),
        handled_at=bindparam("handled"),
        next_attempt_at=bindparam("next_at"),
    )
)


@dataclass
class ApplyReport:
    """What one ``apply_inbox`` call did with the ids it was given.

    ``skipped`` rows were not pending (already applied, rejected, dead, or unknown ids): that is
    what makes a redelivered or duplicated task harmless. ``stale`` events are among the
    ``applied`` ones, but changed nothing: their row already held an equal or newer version
    (``models.mirror.apply_events``). ``failed`` rows stay pending with a later
    ``next_attempt_at`` and are listed in ``retry_ids``; ``dead`` rows gave up for good.
    """

    applied: int = 0
    stale: int = 0
    rejected: int = 0
    skipped: int = 0
    failed: int = 0
    dead: int = 0
    retry_ids: list[int] = field(default_factory=list)
    retry_at_ms: int | None = None

    def merge(self, other: ApplyReport) -> None:
        self.applied += other.applied
        self.stale += other.stale
        self.rejected += other.rejected
        self.merge_failure(other)

    def merge_failure(self, other: ApplyReport) -> None:
        self.skipped += other.skipped
        self.failed += other.failed
        self.dead += other.dead
        self.retry_ids.extend(other.retry_ids)
        if other.retry_at_ms is not None:
            self.retry_at_ms = (
                other.retry_at_ms if self.retry_at_ms is None else min(self.retry_at_ms, other.retry_at_ms)
            )


def backoff_ms(attempts: int, *, rand: Callable[[], float] = random.random) -> int:
    """Delay before attempt ``attempts + 1``: doubling from 2 s up to 10 min, half of it jittered.

    The jitter spreads retries of rows that failed together (a database restart fails a whole
    backlog at once) so they do not come back as one thundering batch.
    """
    ceiling = min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * int(2 ** min(max(attempts, 1) - 1, 20)))
    half = ceiling // 2
    return half + int(rand() * (ceiling - half))


AfterBatch = Callable[[sessionmaker[Session], Sequence[Event], int], object]
"""``hook(factory, events, now_ms)`` after each committed batch (the provisioning rules)."""

OnUnseen = Callable[[list[str]], object]
"""``hook(organization_ids)`` after a committed batch that concerned organizations never seen."""


def apply_inbox(
    factory: sessionmaker[Session],
    ids: Sequence[int],
    *,
    now_ms: int,
    max_attempts: int,
    after_batch: AfterBatch | None = None,
    on_unseen_organizations: OnUnseen | None = None,
    fill_to: int = 0,
    one_by_one: bool = False,
) -> ApplyReport:
    """Apply the still-pending inbox rows among ``ids`` to the mirror.

    The happy path is one transaction for the whole batch: load and lock the rows that are
    still pending (others are skipped), mark unparseable ones ``rejected``, lock the mirror
    rows the rest write (``models.mirror.lock_for_events``), apply them in one
    ``apply_events`` call and mark them ``applied``. So that workers run in parallel, that
    first transaction waits for no organization another worker is writing: the events it could
    not lock (and those that need the whole mirror, when others do not) stay pending for a
    second transaction of the same call, which waits for their locks.

    A ``RetryableError`` (database unreachable, lock timeout) is not the events' fault: every
    row not yet applied gets one more attempt counted and a backoff. Any other exception means
    some event in the batch is poison; the batch is split in halves until the poison rows are
    alone, so the good ones are applied and only the bad ones are charged an attempt. A row
    whose attempts reach ``max_attempts`` is marked ``dead``.

    Raises ``RetryableError`` only when even the failure cannot be recorded (database down):
    nothing changed then, and the caller should retry the same ids later.

    ``after_batch`` runs after each committed batch with its events (the provisioning rules);
    whatever it raises is logged and swallowed: the mirror never waits on, or fails for, it.
    ``on_unseen_organizations`` (reconciliation on demand) is called the same way with the
    organizations the batch concerned that the mirror had no row for before it.

    ``fill_to`` tops the batch up with other due pending rows, oldest first: a worker that
    falls behind then catches up in large transactions instead of one small one per task
    (the tasks of the rows it took find them applied and skip them).

    ``one_by_one`` is for a task the broker redelivered because its worker died: an event that
    kills the process would otherwise kill it again on every redelivery, with no attempt ever
    recorded. Each row is charged its attempt BEFORE it is tried, alone, so such an event ends
    ``dead`` after ``max_attempts`` while the rows around it are applied.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    report = ApplyReport()
    todo = sorted(set(ids))
    if fill_to > len(todo):
        given = set(todo)
        extra = [i for i in _due_pending(factory, now_ms=now_ms, limit=fill_to) if i not in given]
        todo = sorted(given.union(extra[: fill_to - len(todo)]))
    if not todo:
        return report
    if one_by_one:
        for row_id in todo:
            charged = _record_failure(
                factory, [row_id], WorkerLostError(), now_ms=now_ms, max_attempts=max_attempts
            )
            if charged.dead or charged.skipped:
                report.dead += charged.dead
                report.skipped += charged.skipped
                continue
            report.merge(
                apply_inbox(
                    factory,
                    [row_id],
                    now_ms=now_ms,
                    max_attempts=max_attempts,
                    after_batch=after_batch,
                    on_unseen_organizations=on_unseen_organizations,
                )
            )
        return report
    # Halving rather than one transaction per row: one poison event in a batch of 500 costs
    # about 2 * log2(500) transactions instead of 500. The mirror's result does not depend on
    # the order or grouping of events (versions decide), so splitting is safe.
    stack: list[tuple[list[int], bool]] = [(todo, False)]
    # Events parsed by an earlier transaction of this call (deferred ones): not parsed again.
    known: dict[int, Event] = {}
    while stack:
        part, wait = stack.pop()
        unseen: list[str] | None = [] if on_unseen_organizations is not None else None
        try:
            applied, stale, rejected, skipped, events, deferred = _apply_once(
                factory, part, now_ms=now_ms, unseen=unseen, wait=wait, known=known
            )
        except RetryableError as exc:
            remaining = part + [row_id for rest, _ in stack for row_id in rest]
            stack.clear()
            log.warning("applying %d inbox rows failed, will retry: %s", len(remaining), describe_error(exc))
            report.merge_failure(
                _record_failure(factory, remaining, exc, now_ms=now_ms, max_attempts=max_attempts)
            )
        except Exception as exc:
            if len(part) > 1:
                middle = len(part) // 2
                stack.extend(((part[middle:], True), (part[:middle], True)))
                continue
            log.warning("inbox row %d cannot be applied: %s", part[0], describe_error(exc))
            report.merge_failure(
                _record_failure(factory, part, exc, now_ms=now_ms, max_attempts=max_attempts)
            )
        else:
            report.applied += applied
            report.stale += stale
            report.rejected += rejected
            report.skipped += skipped
            if deferred:
                stack.append((deferred, True))
            if after_batch is not None and events:
                _run_after_batch(after_batch, factory, events, now_ms)
            if on_unseen_organizations is not None and unseen:
                _run_on_unseen(on_unseen_organizations, unseen)
    return report


class WorkerLostError(RetryableError):
    """Recorded as the error of a row whose earlier attempt ended with its worker process."""

    def __str__(self) -> str:
        return "a worker process ended while applying this event (redelivered task)"


def _due_pending(factory: sessionmaker[Session], *, now_ms: int, limit: int) -> list[int]:
    with session_scope(factory) as session:
        return list(
            session.scalars(
                select(InboxEvent.id)
                .where(
                    InboxEvent.status == InboxStatus.PENDING,
                    or_(InboxEvent.next_attempt_at.is_(None), InboxEvent.next_attempt_at <= now_ms),
                )
                .order_by(InboxEvent.id)
                .limit(limit)
            )
        )


def _run_on_unseen(hook: OnUnseen, organization_ids: list[str]) -> None:
    try:
        hook(organization_ids)
    except Exception as exc:
        # The batch is committed; the periodic run (or `orgsync sync --org`) lists it later.
        log.error(
            "unseen-organization hook failed for %d organizations: %s",
            len(organization_ids),
            describe_error(exc),
        )


def _run_after_batch(
    hook: AfterBatch, factory: sessionmaker[Session], events: list[Event], now_ms: int
) -> None:
    try:
        hook(factory, events, now_ms)
    except Exception as exc:
        # The batch is committed: rules failing must neither retry it nor mark it failed.
        log.error("after-batch hook failed for %d events: %s", len(events), describe_error(exc))


def _apply_once(
    factory: sessionmaker[Session],
    ids: list[int],
    *,
    now_ms: int,
    unseen: list[str] | None = None,
    wait: bool = True,
    known: dict[int, Event] | None = None,
) -> tuple[int, int, int, int, list[Event], list[int]]:
    """One transaction: (applied, stale among them, rejected, skipped, applied events, ids deferred).

    Nothing is deferred with ``wait``; without it, the rows whose mirror locks were busy.
    ``known`` holds events already parsed by row id; the deferred ones are added to it.
    """
    with session_scope(factory) as session:
        # FOR UPDATE: a second task holding the same ids waits here and then sees them applied,
        # instead of applying them twice. The rows are locked in id order, before any mirror
        # lock: a transaction holding mirror locks never waits for an inbox row.
        rows = session.execute(
            select(InboxEvent.id, InboxEvent.svix_id, InboxEvent.body, InboxEvent.received_at)
            .where(InboxEvent.id.in_(ids), InboxEvent.status == InboxStatus.PENDING)
            .order_by(InboxEvent.id)
            .with_for_update()
        ).all()
        parsed: list[tuple[int, Event]] = []
        rejected: list[dict[str, Any]] = []
        for row in rows:
            try:
                event = known.pop(row.id, None) if known is not None else None
                parsed.append((row.id, event or parse_event(row.svix_id, row.body)))
            except PayloadError as exc:
                reason = redact(str(exc))[:MAX_ERROR_CHARS]
                rejected.append({"row_id": row.id, "error": reason, "now": now_ms})
        deferred: list[int] = []
        if parsed:
            _, covered = lock_for_events(session, [event for _, event in parsed], wait=wait)
            if len(covered) < len(parsed):
                chosen = set(covered)
                deferred = [row_id for n, (row_id, _) in enumerate(parsed) if n not in chosen]
                if known is not None:
                    known.update(item for n, item in enumerate(parsed) if n not in chosen)
                parsed = [parsed[n] for n in covered]
        events = [event for _, event in parsed]
        applied_ids = [row_id for row_id, _ in parsed]
        stale = 0
        if events:
            if unseen is not None:
                # Under the mirror locks, before the batch writes them: "never seen" is exact.
                unseen.extend(unseen_organizations(session, events))
            stale = apply_events(session, events, now_ms=now_ms)
        if applied_ids:
            session.execute(
                update(InboxEvent)
                .where(InboxEvent.id.in_(applied_ids))
                .values(status=InboxStatus.APPLIED, handled_at=now_ms, next_attempt_at=None, last_error=None),
                execution_options={"synchronize_session": False},
            )
        if rejected:
            session.connection().execute(_MARK_REJECTED, rejected)
    skipped = len(ids) - len(rows)
    # Committed: counted once, with each event's wait from receipt to this transaction.
    received = {int(row.id): int(row.received_at) for row in rows}
    metrics.applied((now_ms - received[row_id]) / 1000 for row_id in applied_ids)
    metrics.stale(stale)
    metrics.duplicates(skipped)
    return len(applied_ids), stale, len(rejected), skipped, events, deferred


def _record_failure(
    factory: sessionmaker[Session], ids: list[int], exc: BaseException, *, now_ms: int, max_attempts: int
) -> ApplyReport:
    error = describe_error(exc)
    outcome = ApplyReport()
    with session_scope(factory) as session:
        # FOR UPDATE: two tasks failing on the same row must both count their attempt.
        rows = session.execute(
            select(InboxEvent.id, InboxEvent.attempts)
            .where(InboxEvent.id.in_(ids), InboxEvent.status == InboxStatus.PENDING)
            .order_by(InboxEvent.id)
            .with_for_update()
        ).all()
        changes: list[dict[str, Any]] = []
        for row in rows:
            attempts = row.attempts + 1
            if attempts >= max_attempts:
                changes.append(
                    {
                        "row_id": row.id,
                        "new_status": InboxStatus.DEAD,
                        "new_attempts": attempts,
                        "error": error,
                        "handled": now_ms,
                        "next_at": None,
                    }
                )
                outcome.dead += 1
                continue
            next_at = now_ms + backoff_ms(attempts)
            changes.append(
                {
                    "row_id": row.id,
                    "new_status": InboxStatus.PENDING,
                    "new_attempts": attempts,
                    "error": error,
                    "handled": None,
                    "next_at": next_at,
                }
            )
            outcome.failed += 1
            outcome.retry_ids.append(row.id)
            outcome.retry_at_ms = (
                next_at if outcome.retry_at_ms is None else min(outcome.retry_at_ms, next_at)
            )
        if changes:
            session.connection().execute(_MARK_FAILED, changes)
        outcome.skipped = len(ids) - len(rows)
    # Every row a report counts as skipped is counted once, here or in _apply_once.
    metrics.duplicates(outcome.skipped)
    if outcome.dead:
        metrics.dead(outcome.dead)
        log.error("%d inbox rows are dead after %d attempts: %s", outcome.dead, max_attempts, error)
    return outcome


def sweep_inbox(
    factory: sessionmaker[Session],
    send: Callable[[list[int]], None],
    *,
    now_ms: int,
    grace_ms: int,
    lease_ms: int,
    batch_size: int,
    limit: int,
) -> int:
    """Enqueue pending rows that nobody is working on; returns how many ids were sent.

    This is what makes a lost enqueue (broker down while the web process stored the event) and
    a crashed worker (a message acknowledged or lost with it) harmless: rows older than the
    grace that are still pending and due are sent again, in chunks of ``batch_size``.

    Each sent row is leased for ``lease_ms`` (its ``next_attempt_at`` moves ahead) so that the
    next sweeps do not send it again while its task is still queued; applying ignores the
    lease, and a failure replaces it with the real backoff. If ``send`` raises, the rows not
    sent keep their state and the next sweep tries again.
    """
    with session_scope(factory) as session:
        ids = due_pending_ids(session, now_ms=now_ms, grace_ms=grace_ms, limit=limit)
    sent: list[int] = []
    try:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            send(chunk)
            sent.extend(chunk)
    finally:
        if sent:
            _lease(factory, sent, now_ms=now_ms, until_ms=now_ms + lease_ms)
    return len(sent)


def _lease(factory: sessionmaker[Session], ids: list[int], *, now_ms: int, until_ms: int) -> None:
    with session_scope(factory) as session:
        session.execute(
            update(InboxEvent)
            .where(
                InboxEvent.id.in_(ids),
                InboxEvent.status == InboxStatus.PENDING,
                # A task that already ran and failed set a real backoff: keep it.
                or_(InboxEvent.next_attempt_at.is_(None), InboxEvent.next_attempt_at <= now_ms),
            )
            .values(next_attempt_at=until_ms),
            execution_options={"synchronize_session": False},
        )
