"""Deliver the notification outbox to ``ORGSYNC_NOTIFY_URLS`` as signed Standard Webhooks.

Each row of ``notifications`` (``models.notifications``) is POSTed to every URL as
``{"id", "type", "timestamp", "data"}`` with the ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` headers of the Standard Webhooks format, signed with
``ORGSYNC_NOTIFY_SECRET`` by the ``svix`` library (so ``svix.webhooks.Webhook.verify``, or any
Standard Webhooks library, checks it). The ``webhook-id`` is the event's id, the same on every
attempt: a receiver that answered late or twice de-duplicates on it.

Ordering: rows of one ordering key (an organization; a user for user events) are delivered in
outbox order, one after the other; a row is tried only once every earlier row of its key was
delivered or went dead. Keys are independent: one organization's failing receiver-side
handling never holds up another's, and several keys are delivered at once.

Retries: a row that any URL refused (no 2xx, or no answer in ``ORGSYNC_NOTIFY_TIMEOUT``) is
tried again after ``ORGSYNC_NOTIFY_RETRY_BASE`` doubled per attempt (capped at ten minutes), and
only to the URLs that have not acknowledged it. Once it has been failing for
``ORGSYNC_NOTIFY_DEAD_AFTER`` since it was recorded, it is ``dead``: the rows after it go on,
and ``orgsync notifications retry`` sends it again.

One drain at a time: on PostgreSQL a session advisory lock makes a second concurrent drain
return at once, so two workers never reorder a key; the embedded SQLite setup runs one worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import Engine, bindparam, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from svix.webhooks import Webhook

from models.db import session_scope
from models.notifications import OUTBOX, emit_expired, webhook_body
from models.settings import NOTIFY_RETRY_CAP_S, Settings
from models.tables import NotificationStatus

log = logging.getLogger(__name__)

# Any number works; it only has to differ from the mirror's lock and be the same everywhere.
DRAIN_LOCK_KEY = 0x6F7267_6E6F7466
MAX_ERROR_CHARS = 500
USER_AGENT = "orgsync-notify/1"


def url_digest(url: str) -> str:
    """What the outbox keeps of a URL that acknowledged a row: never the URL (it may hold a token)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def backoff_ms(attempts: int, base_s: float) -> int:
    """The wait after the ``attempts``-th failure: ``base_s`` doubled per attempt, capped."""
    return int(min(NOTIFY_RETRY_CAP_S, base_s * 2 ** max(0, attempts - 1)) * 1000)


@dataclass(frozen=True)
class Outcome:
    """One delivery attempt of one row: the URLs that now have it, and the first refusal."""

    row_id: int
    delivered_to: tuple[str, ...]
    error: str | None


class Sender:
    """Signs and POSTs rows to every receiver; thread-safe (one pooled HTTP client)."""

    def __init__(
        self,
        urls: Sequence[str],
        secret: str,
        *,
        timeout_s: float,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not urls:
            raise ValueError("no receiver URLs")
        self.urls = tuple(urls)
        self._webhook = Webhook(secret)
        self._client = client or httpx.Client(
            timeout=timeout_s,
            headers={"user-agent": USER_AGENT},
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=32),
        )
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> Sender | None:
        if not settings.notify_urls or settings.notify_secret is None:
            return None
        return cls(settings.notify_urls, settings.notify_secret, timeout_s=settings.notify_timeout)

    def signed(self, event_id: str, payload: str) -> dict[str, str]:
        """The Standard Webhooks headers of one attempt at ``payload`` (signed now)."""
        now = datetime.fromtimestamp(int(self._clock()), tz=UTC)
        return {
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._webhook.sign(event_id, now, payload),
        }

    def send(self, row: Any) -> Outcome:
        body = webhook_body(row.event_id, row.type, row.created_at, row.data)
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        done = list(row.delivered_to or [])
        error: str | None = None
        for position, url in enumerate(self.urls, start=1):
            digest = url_digest(url)
            if digest in done:
                continue
            problem = self._post(url, row.event_id, payload)
            if problem is None:
                done.append(digest)
            elif error is None:
                # Receivers are named by position: a URL may carry a token.
                error = f"receiver {position} of {len(self.urls)}: {problem}"
        return Outcome(row.id, tuple(done), error)

    def _post(self, url: str, event_id: str, payload: str) -> str | None:
        try:
            response = self._client.post(
                url, content=payload.encode(), headers=self.signed(event_id, payload)
            )
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    def close(self) -> None:
        self._client.close()


@dataclass
class DrainReport:
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    expired_announced: int = 0
    busy: bool = False
    keys: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "dead": self.dead,
            "expired_announced": self.expired_announced,
            "busy": self.busy,
        }


@contextmanager
def drain_lock(engine: Engine) -> Iterator[bool]:
    """True while this process holds the one drain lock (always on SQLite: one worker there)."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as connection:
        held = bool(
            connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": DRAIN_LOCK_KEY}).scalar()
        )
        connection.commit()
        try:
            yield held
        finally:
            if held:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": DRAIN_LOCK_KEY})
                connection.commit()


def _due_heads(session: Session, *, now_ms: int, per_key: int, max_rows: int) -> dict[str, list[Any]]:
    """Up to ``per_key`` pending rows of each ordering key whose oldest pending row is due."""
    ranked = select(
        OUTBOX,
        func.row_number().over(partition_by=OUTBOX.c.ordering_key, order_by=OUTBOX.c.id).label("rank"),
    ).where(OUTBOX.c.status == NotificationStatus.PENDING)
    window = ranked.subquery()
    rows = session.execute(
        select(window).where(window.c.rank <= per_key).order_by(window.c.id).limit(max_rows)
    ).all()
    keys: dict[str, list[Any]] = {}
    for row in rows:
        keys.setdefault(row.ordering_key, []).append(row)
    # A key whose oldest pending row waits for its retry waits as a whole.
    return {key: items for key, items in keys.items() if items[0].next_attempt_at <= now_ms}


def _deliver_key(sender: Sender, rows: list[Any]) -> list[Outcome]:
    """The key's rows in order, stopping at the first one not acknowledged by every URL."""
    outcomes = []
    for row in rows:
        outcome = sender.send(row)
        outcomes.append(outcome)
        if outcome.error is not None:
            break
    return outcomes


_DELIVERED = (
    update(OUTBOX)
    .where(OUTBOX.c.id == bindparam("row_id"), OUTBOX.c.status == NotificationStatus.PENDING)
    .values(
        status=NotificationStatus.DELIVERED,
        attempts=OUTBOX.c.attempts + 1,
        delivered_to=bindparam("done"),
        delivered_at=bindparam("now"),
        last_error=None,
    )
)
_FAILED = (
    update(OUTBOX)
    .where(OUTBOX.c.id == bindparam("row_id"), OUTBOX.c.status == NotificationStatus.PENDING)
    .values(
        status=bindparam("new_status"),
        attempts=bindparam("new_attempts"),
        delivered_to=bindparam("done"),
        next_attempt_at=bindparam("retry_at"),
        last_error=bindparam("error"),
    )
)


def drain(
    factory: sessionmaker[Session],
    sender: Sender,
    *,
    clock_ms: Callable[[], int],
    dead_after_ms: int,
    retry_base_s: float,
    per_key: int = 50,
    max_rows: int = 2000,
    threads: int = 8,
    budget_s: float = 60.0,
) -> DrainReport:
    """Deliver what is due, round after round, until nothing is due or ``budget_s`` is spent."""
    report = DrainReport()
    engine = factory.kw["bind"]
    with drain_lock(engine) as held:
        if not held:
            report.busy = True
            return report
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="orgsync-notify") as pool:
            while time.monotonic() - started < budget_s:
                now = clock_ms()
                with session_scope(factory) as session:
                    keys = _due_heads(session, now_ms=now, per_key=per_key, max_rows=max_rows)
                if not keys:
                    break
                rows = {row.id: row for items in keys.values() for row in items}
                results = list(pool.map(lambda items: _deliver_key(sender, items), keys.values()))
                progressed = _record(
                    factory,
                    rows,
                    results,
                    now=clock_ms(),
                    dead_after_ms=dead_after_ms,
                    retry_base_s=retry_base_s,
                    report=report,
                )
                report.keys.update(keys)
                if not progressed:
                    break
    return report


def _record(
    factory: sessionmaker[Session],
    rows: dict[int, Any],
    results: list[list[Outcome]],
    *,
    now: int,
    dead_after_ms: int,
    retry_base_s: float,
    report: DrainReport,
) -> bool:
    delivered: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for outcomes in results:
        for outcome in outcomes:
            if outcome.error is None:
                delivered.append({"row_id": outcome.row_id, "done": list(outcome.delivered_to), "now": now})
                continue
            row = rows[outcome.row_id]
            attempts = row.attempts + 1
            dead = now - row.created_at >= dead_after_ms
            failed.append(
                {
                    "row_id": outcome.row_id,
                    "new_status": NotificationStatus.DEAD if dead else NotificationStatus.PENDING,
                    "new_attempts": attempts,
                    "done": list(outcome.delivered_to),
                    "retry_at": now + backoff_ms(attempts, retry_base_s),
                    "error": outcome.error[:MAX_ERROR_CHARS],
                }
            )
            if dead:
                report.dead += 1
                log.warning("notification %s (%s) is dead: %s", row.event_id, row.type, outcome.error)
            else:
                report.failed += 1
    with session_scope(factory) as session:
        connection = session.connection()
        if delivered:
            connection.execute(_DELIVERED, delivered)
        if failed:
            connection.execute(_FAILED, failed)
    report.delivered += len(delivered)
    return bool(delivered) or any(item["new_status"] == NotificationStatus.DEAD for item in failed)


def announce_expired(factory: sessionmaker[Session], *, now_ms: int) -> int:
    """Record ``invitation.expired`` for invitations that lapsed since the last scan."""
    with session_scope(factory) as session:
        return len(emit_expired(session, now_ms=now_ms))
