"""Reconciliation against the Backend API: list everything, write what is newer, re-check what is missing.

A run lists users, permissions, roles, role sets and domains, then organizations page by page
(``+created_at``, 500 a page); each organization's memberships and invitations (every status:
one call for any organization with fewer than 500, and accepted or revoked ones are repaired
without a GET each) are fetched by a few threads while this thread writes finished
organizations in batches, in listing order.
Versions (``models.reconcile``) make every write newer-only, so webhooks applied meanwhile are
never overwritten by an older listing. Rows missing from a complete listing are re-checked
(memberships a hundred users per filtered list, invitations with a GET each) and tombstoned
only on Clerk's word.

Resumable: after each batch the run saves the ``(created_at, id)`` of the last organization it
finished. A run that was interrupted (or whose process died: its heartbeat goes stale) is
taken over by the next one, which lists organizations again (a call per 500) but fetches only
the memberships of those after the cursor.

Every call goes through a ``RateLimiter`` holding ``reconcile_share`` of the instance budget,
shared with the commands through the same storage, so reconciliation never starves them.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from models.clock import now_ms
from models.db import session_scope
from models.errors import ConfigError, OrganizationNotFoundError, RetryableError
from models.events import (
    DOMAINS,
    INVITATIONS,
    MEMBERSHIPS,
    ORGANIZATIONS,
    PERMISSIONS,
    ROLE_SETS,
    ROLES,
    USERS,
)
from models.reconcile import (
    SCOPE_INSTANCE,
    SCOPE_ORGANIZATION,
    Absent,
    Drift,
    RunState,
    SyncBusyError,
    absent_rows,
    claim_run,
    finish_run,
    save_run,
    tombstone_objects,
    tombstone_rows,
    write_listing,
)
from models.redact import describe_error
from models.settings import Settings
from models.tables import Organization, SyncStatus
from worker.clerk import PAGE_LIMIT, ApiPage, CallRecord, ClerkClient, ClerkRefusalError, ClerkTransientError
from worker.process import PerProcess
from worker.ratelimit import RateLimiter, RateLimitTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")
Json = dict[str, Any]

PURPOSE = "reconcile"
CONSUMER = "reconcile"
ORDER_BY = "+created_at"
DEFAULT_WORKERS = 4
# A run whose heartbeat is older than this is taken to be dead, and the next run resumes it.
STALE_AFTER_MS = 120_000
HEARTBEAT_S = 10.0
# A batch is written once it holds this many rows or organizations, or waited this long.
FLUSH_ROWS = 2_000
FLUSH_ORGS = 200
FLUSH_AFTER_S = 2.0
# Transient failures (5xx, timeouts, a 429 storm, no rate-limit slot) of one GET: tried this often.
CALL_ATTEMPTS = 4
# Memberships re-checked per call: user ids in one filtered list (the URL stays a few KB).
RECHECK_USERS = 100
# Waits shorter than this are the limiter's own bookkeeping, not a wait for the budget.
WAIT_NOTICED_S = 0.005
MAX_ERROR_CHARS = 500


class SyncInterruptedError(RetryableError):
    """The run was asked to stop; it is saved and the next run resumes it."""


class CountingLimiter(RateLimiter):
    """The shared limiter, counting how often a call had to wait for the budget."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._count_lock = threading.Lock()
        self._waits = 0

    def acquire(self, membership_key: str | None = None, *, timeout: float = 60.0) -> float:
        waited = super().acquire(membership_key, timeout=timeout)
        if waited > WAIT_NOTICED_S:
            with self._count_lock:
                self._waits += 1
        return waited

    @property
    def waits(self) -> int:
        with self._count_lock:
            return self._waits


def reconcile_limiter(settings: Settings) -> CountingLimiter:
    """The instance budget shared with the commands, capped at ``reconcile_share`` of it."""
    return CountingLimiter(
        settings.rate_limit_storage,
        settings.rate_limit,
        settings.membership_rate_limit,
        share=settings.reconcile_share,
        consumer=CONSUMER,
    )


def reconcile_client(settings: Settings, *, limit_wait: float = 60.0) -> ClerkClient:
    return ClerkClient.from_settings(settings, reconcile_limiter(settings), limit_wait=limit_wait)


@dataclass(frozen=True)
class Progress:
    """Where a run is, for a progress bar: ``organizations_total`` is None until the first page."""

    phase: str
    organizations_done: int
    organizations_total: int | None
    rows: int
    api_calls: int
    rate_limit_waits: int
    elapsed_s: float
    drift: int

    @property
    def eta_s(self) -> float | None:
        total, done = self.organizations_total, self.organizations_done
        if not total or not done or done >= total:
            return None
        return self.elapsed_s / done * (total - done)


@dataclass(frozen=True)
class SyncResult:
    """The outcome of one run, as ``orgsync sync --json`` prints it."""

    run_id: int
    scope: str
    organization_id: str | None
    status: str
    resumed: bool
    organizations: int
    rows: int
    api_calls: int
    rate_limit_waits: int
    elapsed_s: float
    drift: Drift
    error: str | None = None
    write_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "object": "sync_run",
            "id": self.run_id,
            "scope": self.scope,
            "organization_id": self.organization_id,
            "status": self.status,
            "resumed": self.resumed,
            "organizations": self.organizations,
            "rows": self.rows,
            "api_calls": self.api_calls,
            "rate_limit_waits": self.rate_limit_waits,
            "elapsed_s": round(self.elapsed_s, 3),
            "drift": self.drift.as_dict(),
            "drift_total": self.drift.total,
            "write_s": round(self.write_s, 3),
            "error": self.error,
        }


@dataclass
class _OrgListing:
    organization_id: str
    cursor: tuple[int, str]
    started_ms: int
    memberships: list[Json] = field(default_factory=list)
    invitations: list[Json] = field(default_factory=list)
    gone: bool = False

    @property
    def rows(self) -> int:
        return len(self.memberships) + len(self.invitations)


def _cursor(org: Json) -> tuple[int, str]:
    created = org.get("created_at")
    return (created if isinstance(created, int) else 0, str(org.get("id") or ""))


def _user_id(item: Json) -> str:
    return str((item.get("public_user_data") or {}).get("user_id") or item.get("user_id") or "")


class Reconciler:
    """One run: ``Reconciler(factory, client).run()`` or ``.run(organization="org_..."|slug)``."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        client: ClerkClient,
        *,
        workers: int = DEFAULT_WORKERS,
        clock_ms: Callable[[], int] = now_ms,
        on_progress: Callable[[Progress], None] | None = None,
        stop: threading.Event | None = None,
        stale_after_ms: int = STALE_AFTER_MS,
        sleep: Callable[[float], None] = time.sleep,
        call_attempts: int = CALL_ATTEMPTS,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if call_attempts < 1:
            raise ValueError("call_attempts must be at least 1")
        self._call_attempts = call_attempts
        self._factory = factory
        self._client = client.with_recorder(self._record)
        self._limiter = client.limiter
        self._workers = workers
        self._clock = clock_ms
        self._on_progress = on_progress
        self._stop = stop or threading.Event()
        self._abort = threading.Event()
        self._stale_after_ms = stale_after_ms
        self._sleep = sleep
        self._lock = threading.Lock()
        self._failed_calls: list[CallRecord] = []
        self._calls = 0
        self._refusals = 0
        self._base_waits = 0
        self._rows = 0
        self._orgs_done = 0
        self._orgs_total: int | None = None
        self._drift = Drift()
        self._phase = "starting"
        self._began = time.monotonic()
        self._run_id = 0
        self._cursor: tuple[int, str] | None = None
        self._last_beat = time.monotonic()
        self._write_s = 0.0

    # ------------------------------------------------------------ accounting
    @contextmanager
    def _session(self) -> Iterator[Session]:
        """A transaction, timed: the share of the run spent writing the mirror."""
        began = time.monotonic()
        try:
            with session_scope(self._factory) as session:
                yield session
        finally:
            self._write_s += time.monotonic() - began

    def _record(self, record: CallRecord) -> None:
        with self._lock:
            self._calls += 1
            if record.status_code == 429:
                self._refusals += 1
            if record.status_code is None or record.status_code >= 400:
                self._failed_calls.append(record)

    def _waits(self) -> int:
        counted = self._limiter.waits if isinstance(self._limiter, CountingLimiter) else 0
        with self._lock:
            return self._base_waits + counted + self._refusals

    def _state(self) -> RunState:
        with self._lock:
            calls = self._calls
        progress: dict[str, Any] = {"phase": self._phase, "organizations_done": self._orgs_done}
        if self._orgs_total is not None:
            progress["organizations_total"] = self._orgs_total
        if self._cursor is not None:
            progress["after"] = list(self._cursor)
        return RunState(progress, self._drift, calls, self._waits(), self._rows)

    def progress(self) -> Progress:
        with self._lock:
            calls = self._calls
        return Progress(
            self._phase,
            self._orgs_done,
            self._orgs_total,
            self._rows,
            calls,
            self._waits(),
            time.monotonic() - self._began,
            self._drift.total,
        )

    def _report(self) -> None:
        if self._on_progress is not None:
            self._on_progress(self.progress())

    def _store_failed_calls(self, session: Session) -> None:
        with self._lock:
            records, self._failed_calls = self._failed_calls, []
        session.add_all(record.to_row() for record in records)

    def _checkpoint(self, session: Session) -> None:
        """Save counters, drift and cursor in the caller's transaction (a heartbeat too)."""
        self._store_failed_calls(session)
        save_run(session, self._run_id, self._state(), now_ms=self._clock())
        self._last_beat = time.monotonic()

    def _heartbeat(self) -> None:
        with self._session() as session:
            self._checkpoint(session)

    # ------------------------------------------------------------------ calls
    def _check_stop(self) -> None:
        if self._stop.is_set() or self._abort.is_set():
            raise SyncInterruptedError("reconciliation stopped; the next run resumes it")

    def _call(self, operation: Callable[[], T]) -> T:
        """One GET, repeated on transient failures (a read is always safe to repeat)."""
        for attempt in range(1, self._call_attempts + 1):
            self._check_stop()
            try:
                return operation()
            except (ClerkTransientError, RateLimitTimeoutError) as exc:
                if attempt == self._call_attempts:
                    raise
                if isinstance(exc, RateLimitTimeoutError):
                    delay = exc.wait_s
                else:
                    delay = exc.retry_after if exc.retry_after is not None else min(8.0, 0.5 * 2**attempt)
                log.info("reconcile: %s; trying again in %.1f s", exc, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _all(self, fetch: Callable[[int], ApiPage]) -> list[Json]:
        items: list[Json] = []
        offset = 0
        while True:
            page = self._call(functools.partial(fetch, offset))
            items.extend(page.data)
            offset += len(page.data)
            if not page.data or offset >= page.total_count:
                return items

    def _fetch_org(self, organization_id: str, cursor: tuple[int, str]) -> _OrgListing:
        listing = _OrgListing(organization_id, cursor, self._clock())
        client = self._client
        try:
            listing.memberships = self._all(
                lambda at: client.list_memberships(
                    organization_id, limit=PAGE_LIMIT, offset=at, order_by=ORDER_BY, purpose=PURPOSE
                )
            )
            listing.invitations = self._all(
                lambda at: client.list_invitations(
                    organization_id, limit=PAGE_LIMIT, offset=at, order_by=ORDER_BY, purpose=PURPOSE
                )
            )
        except ClerkRefusalError as exc:
            if exc.status != 404:
                raise
            listing.gone = True
        return listing

    def _get_organization(self, ref: str) -> Json | None:
        try:
            return self._call(lambda: self._client.get_organization(ref, purpose=PURPOSE))
        except ClerkRefusalError as exc:
            if exc.status == 404:
                return None
            raise

    # -------------------------------------------------------------- the run
    def run(self, organization: str | None = None) -> SyncResult:
        """Reconcile the whole instance, or one organization (id or slug); never raises for a
        failure of the run itself: the result's status says interrupted or failed."""
        self._began = time.monotonic()
        resumed = False
        target: Json | None = None
        started_ms = self._clock()
        if organization is not None:
            target = self._get_organization(organization)
            org_id = str(target["id"]) if target is not None else self._mirror_org_id(organization)
            scope = SCOPE_ORGANIZATION
        else:
            org_id = None
            scope = SCOPE_INSTANCE
        with self._session() as session:
            run, resumed = claim_run(
                session,
                scope=scope,
                organization_id=org_id,
                now_ms=self._clock(),
                stale_after_ms=self._stale_after_ms,
            )
            self._run_id = run.id
            if resumed:
                self._resume_from(
                    run.progress or {}, run.drift, run.api_calls, run.rate_limit_waits, run.rows_seen
                )
        status, error = SyncStatus.COMPLETED, None
        try:
            if org_id is not None:
                self._sync_one(org_id, target, started_ms)
            else:
                # Users and permissions first: the copies memberships embed derive from them.
                self._sync_listed(USERS, self._client.list_users)
                self._sync_listed(PERMISSIONS, self._client.list_permissions)
                self._sync_roles()
                # Who may join and with which roles: role sets and domain enrollment.
                self._sync_listed(ROLE_SETS, self._client.list_role_sets)
                self._sync_listed(DOMAINS, self._client.list_organization_domains)
                self._sync_organizations()
            self._phase = "done"
        except (SyncInterruptedError, RetryableError, KeyboardInterrupt) as exc:
            status, error = SyncStatus.INTERRUPTED, describe_error(exc)[:MAX_ERROR_CHARS]
        except Exception as exc:
            log.exception("reconciliation run %d failed", self._run_id)
            status, error = SyncStatus.FAILED, describe_error(exc)[:MAX_ERROR_CHARS]
        finally:
            self._abort.set()
        with self._session() as session:
            self._store_failed_calls(session)
            finish_run(session, self._run_id, self._state(), status=status, now_ms=self._clock(), error=error)
        self._report()
        progress = self.progress()
        return SyncResult(
            run_id=self._run_id,
            scope=scope,
            organization_id=org_id,
            status=status,
            resumed=resumed,
            organizations=self._orgs_done,
            rows=self._rows,
            api_calls=progress.api_calls,
            rate_limit_waits=progress.rate_limit_waits,
            elapsed_s=progress.elapsed_s,
            drift=self._drift,
            error=error,
            write_s=self._write_s,
        )

    def _resume_from(
        self, progress: dict[str, Any], drift: dict[str, Any] | None, calls: int, waits: int, rows: int
    ) -> None:
        after = progress.get("after")
        if isinstance(after, list) and len(after) == 2:
            self._cursor = (int(after[0]), str(after[1]))
        self._orgs_done = int(progress.get("organizations_done") or 0)
        self._drift = Drift.from_dict(drift)
        with self._lock:
            self._calls = calls
        self._base_waits = waits
        self._rows = rows

    def _mirror_org_id(self, ref: str) -> str:
        with self._session() as session:
            found = session.scalars(
                select(Organization.id).where(or_(Organization.id == ref, Organization.slug == ref)).limit(1)
            ).first()
        if found is None:
            raise OrganizationNotFoundError(
                f"no organization with id or slug {ref!r} in Clerk or in the mirror"
            )
        return str(found)

    # ------------------------------------------------------------------ roles
    def _list_roles(self) -> list[Json]:
        client = self._client
        return self._all(
            lambda at: client.list_roles(limit=PAGE_LIMIT, offset=at, order_by=ORDER_BY, purpose=PURPOSE)
        )

    def _sync_roles(self) -> None:
        self._phase = "roles"
        started = self._clock()
        roles = self._list_roles()
        seen = {(str(role.get("id")),) for role in roles}
        with self._session() as session:
            self._drift.merge(write_listing(session, ROLES, roles, now_ms=self._clock()))
            missing = absent_rows(session, ROLES, seen=seen, listed_since_ms=started)
            self._checkpoint(session)
        self._rows += len(roles)
        if not missing:
            return
        # The client has no GET for one role: a second complete listing, begun after the first
        # ended, stands in for it.
        again = {(str(role.get("id")),) for role in self._list_roles()}
        gone = [item.key[0] for item in missing if item.key not in again]
        if gone:
            with self._session() as session:
                self._drift.merge(
                    tombstone_objects(session, ROLES, gone, listed_since_ms=started, now_ms=self._clock())
                )
                self._checkpoint(session)

    # ------------------------------------------------------ users, permissions
    def _sync_listed(self, kind: str, lister: Callable[..., ApiPage]) -> None:
        """A complete listing written newer-only; what two listings in a row miss is gone."""

        def listing() -> list[Json]:
            return self._all(
                lambda at: lister(limit=PAGE_LIMIT, offset=at, order_by=ORDER_BY, purpose=PURPOSE)
            )

        self._phase = kind
        started = self._clock()
        try:
            items = listing()
        except ClerkRefusalError as exc:
            if exc.status not in (404, 405):
                raise
            # An API without this listing (an older emulator): the rest of the run still holds.
            log.warning("reconcile: the Backend API cannot list %s (%s); skipping them", kind, exc.status)
            return
        seen = {(str(item.get("id")),) for item in items}
        with self._session() as session:
            self._drift.merge(write_listing(session, kind, items, now_ms=self._clock()))
            missing = absent_rows(session, kind, seen=seen, listed_since_ms=started)
            self._checkpoint(session)
        self._rows += len(items)
        if not missing:
            return
        again = {(str(item.get("id")),) for item in listing()}
        gone = [item.key[0] for item in missing if item.key not in again]
        if gone:
            with self._session() as session:
                self._drift.merge(
                    tombstone_objects(session, kind, gone, listed_since_ms=started, now_ms=self._clock())
                )
                self._checkpoint(session)

    # ---------------------------------------------------------- organizations
    def _sync_one(self, org_id: str, org: Json | None, started_ms: int) -> None:
        self._phase = "organizations"
        self._orgs_total = 1
        if org is None:
            with self._session() as session:
                gone = tombstone_objects(
                    session, ORGANIZATIONS, [org_id], listed_since_ms=started_ms, now_ms=self._clock()
                )
                self._drift.merge(gone)
                self._checkpoint(session)
            self._orgs_done = 1
            return
        with self._session() as session:
            self._drift.merge(write_listing(session, ORGANIZATIONS, [org], now_ms=self._clock()))
        self._rows += 1
        self._write_batch([self._fetch_org(org_id, _cursor(org))])

    def _sync_organizations(self) -> None:
        self._phase = "organizations"
        listing_started = self._clock()
        seen: set[tuple[str, ...]] = set()
        after = self._cursor
        done_before = self._orgs_done if after is not None else 0
        self._orgs_done = done_before
        pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="orgsync-reconcile")
        inflight: deque[Future[_OrgListing]] = deque()
        buffer: list[_OrgListing] = []
        last_flush = time.monotonic()
        client = self._client
        try:
            offset = 0
            while True:
                page = self._call(
                    functools.partial(
                        client.list_organizations,
                        limit=PAGE_LIMIT,
                        offset=offset,
                        order_by=ORDER_BY,
                        purpose=PURPOSE,
                    )
                )
                self._orgs_total = page.total_count
                with self._session() as session:
                    self._drift.merge(write_listing(session, ORGANIZATIONS, page.data, now_ms=self._clock()))
                    self._checkpoint(session)
                self._rows += len(page.data)
                # Clerk orders by created_at only; ordering ties by id as well makes "everything
                # up to the cursor is done" true for equal created_at within a page.
                for org in sorted(page.data, key=_cursor):
                    seen.add((str(org["id"]),))
                    cursor = _cursor(org)
                    if after is not None and cursor <= after:
                        continue
                    inflight.append(pool.submit(self._fetch_org, str(org["id"]), cursor))
                    while len(inflight) >= self._workers * 4:
                        buffer.append(self._wait(inflight.popleft()))
                        if self._due(buffer, last_flush):
                            self._write_batch(buffer)
                            buffer, last_flush = [], time.monotonic()
                offset += len(page.data)
                if not page.data or offset >= page.total_count:
                    break
            while inflight:
                buffer.append(self._wait(inflight.popleft()))
                if self._due(buffer, last_flush):
                    self._write_batch(buffer)
                    buffer, last_flush = [], time.monotonic()
            if buffer:
                self._write_batch(buffer)
                buffer = []
        finally:
            if buffer or inflight:
                self._abort.set()
            pool.shutdown(wait=True, cancel_futures=True)
        self._sync_missing_organizations(seen, listing_started)

    def _wait(self, future: Future[_OrgListing]) -> _OrgListing:
        while True:
            try:
                return future.result(timeout=HEARTBEAT_S)
            except FutureTimeout:
                # Rate-limited waits can be long: keep the run visibly alive meanwhile.
                self._heartbeat()

    @staticmethod
    def _due(buffer: list[_OrgListing], last_flush: float) -> bool:
        rows = sum(listing.rows for listing in buffer)
        waited = time.monotonic() - last_flush
        return rows >= FLUSH_ROWS or len(buffer) >= FLUSH_ORGS or waited >= FLUSH_AFTER_S

    def _sync_missing_organizations(self, seen: set[tuple[str, ...]], listing_started: int) -> None:
        """Organizations the mirror has and the complete listing did not show: gone, or missed by
        offset paging while others were deleted (then they are reconciled like the rest)."""
        with self._session() as session:
            missing = absent_rows(session, ORGANIZATIONS, seen=seen, listed_since_ms=listing_started)
        gone: list[str] = []
        for item in missing:
            self._keep_alive()
            org = self._get_organization(item.key[0])
            if org is None:
                gone.append(item.key[0])
                continue
            with self._session() as session:
                self._drift.merge(write_listing(session, ORGANIZATIONS, [org], now_ms=self._clock()))
            self._write_batch([self._fetch_org(item.key[0], _cursor(org))], advance=False)
        if gone:
            with self._session() as session:
                self._drift.merge(
                    tombstone_objects(
                        session, ORGANIZATIONS, gone, listed_since_ms=listing_started, now_ms=self._clock()
                    )
                )
                self._checkpoint(session)

    # ------------------------------------------------------------ one batch
    def _write_batch(self, listings: list[_OrgListing], *, advance: bool = True) -> None:
        """Write a batch of organizations' listings, re-check what they lack, then move the cursor."""
        present = [listing for listing in listings if not listing.gone]
        candidates: list[tuple[_OrgListing, Absent]] = []
        with self._session() as session:
            now = self._clock()
            members = [item for listing in present for item in listing.memberships]
            invitations = [item for listing in present for item in listing.invitations]
            self._drift.merge(write_listing(session, MEMBERSHIPS, members, now_ms=now))
            self._drift.merge(write_listing(session, INVITATIONS, invitations, now_ms=now))
            for listing in present:
                org_id = listing.organization_id
                seen_members = {(org_id, _user_id(item)) for item in listing.memberships}
                seen_invitations = {(str(item.get("id")),) for item in listing.invitations}
                for kind, seen in ((MEMBERSHIPS, seen_members), (INVITATIONS, seen_invitations)):
                    for absent in absent_rows(
                        session, kind, seen=seen, listed_since_ms=listing.started_ms, organization_id=org_id
                    ):
                        candidates.append((listing, absent))
        self._rows += sum(listing.rows for listing in present)
        relisted: dict[str, list[Json]] = {MEMBERSHIPS: [], INVITATIONS: []}
        gone_rows: dict[int, tuple[int, list[Absent]]] = {}
        by_listing: dict[int, tuple[_OrgListing, list[Absent]]] = {}
        for listing, absent in candidates:
            by_listing.setdefault(id(listing), (listing, []))[1].append(absent)
        for listing, missing in by_listing.values():
            found, gone = self._recheck(listing.organization_id, missing)
            for kind, items in found.items():
                relisted[kind].extend(items)
            if gone:
                gone_rows[id(listing)] = (listing.started_ms, gone)
        # An organization whose memberships answered 404 is re-checked like any missing row.
        gone_orgs = [
            listing
            for listing in listings
            if listing.gone and self._get_organization(listing.organization_id) is None
        ]
        with self._session() as session:
            now = self._clock()
            for kind, items in relisted.items():
                if items:
                    self._drift.merge(write_listing(session, kind, items, now_ms=now))
            for since, rows in gone_rows.values():
                self._drift.merge(tombstone_rows(session, rows, listed_since_ms=since, now_ms=now))
            for listing in gone_orgs:
                self._drift.merge(
                    tombstone_objects(
                        session,
                        ORGANIZATIONS,
                        [listing.organization_id],
                        listed_since_ms=listing.started_ms,
                        now_ms=now,
                    )
                )
            if advance:
                self._orgs_done += len(listings)
                self._cursor = max(listing.cursor for listing in listings) if listings else self._cursor
            self._checkpoint(session)
        self._report()

    def _recheck(
        self, organization_id: str, missing: list[Absent]
    ) -> tuple[dict[str, list[Json]], list[Absent]]:
        """Ask Clerk about rows a listing lacked: (what it still has, by kind; what it confirms gone).

        Memberships are asked about RECHECK_USERS at a time, as a membership list filtered by
        user id (the API's way to GET memberships); invitations one GET each. A 404 for the
        organization means everything in it not yet found is gone.
        """
        client = self._client
        found: dict[str, list[Json]] = {MEMBERSHIPS: [], INVITATIONS: []}
        answered: set[int] = set()
        gone: list[Absent] = []
        members = [item for item in missing if item.kind == MEMBERSHIPS]
        invitations = [item for item in missing if item.kind == INVITATIONS]
        try:
            for start in range(0, len(members), RECHECK_USERS):
                chunk = members[start : start + RECHECK_USERS]
                page = self._call(
                    functools.partial(
                        client.list_memberships,
                        organization_id,
                        user_ids=[item.key[1] for item in chunk],
                        limit=PAGE_LIMIT,
                        order_by=ORDER_BY,
                        purpose=PURPOSE,
                    )
                )
                present = {_user_id(obj): obj for obj in page.data}
                for item in chunk:
                    answered.add(id(item))
                    if item.key[1] in present:
                        found[MEMBERSHIPS].append(present[item.key[1]])
                    else:
                        gone.append(item)
                self._keep_alive()
            for item in invitations:
                try:
                    found[INVITATIONS].append(
                        self._call(
                            functools.partial(
                                client.get_invitation, organization_id, item.key[0], purpose=PURPOSE
                            )
                        )
                    )
                except ClerkRefusalError as exc:
                    if exc.status != 404:
                        raise
                    gone.append(item)
                answered.add(id(item))
                self._keep_alive()
        except ClerkRefusalError as exc:
            if exc.status != 404:
                raise
            gone.extend(item for item in missing if id(item) not in answered)
        return found, gone

    def _keep_alive(self) -> None:
        """A heartbeat now and then during long series of calls, so no other run takes over."""
        if time.monotonic() - self._last_beat >= HEARTBEAT_S:
            self._heartbeat()


def run_reconcile(
    factory: sessionmaker[Session],
    client: ClerkClient,
    *,
    organization: str | None = None,
    workers: int = DEFAULT_WORKERS,
    on_progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    clock_ms: Callable[[], int] = now_ms,
    stale_after_ms: int = STALE_AFTER_MS,
    call_attempts: int = CALL_ATTEMPTS,
) -> SyncResult:
    """One reconciliation run (the body of ``orgsync sync`` and of the reconcile tasks).

    Raises ``SyncBusyError`` if a run of the same scope is running, ``OrganizationNotFoundError``
    for an unknown ``organization``; every other failure is in the result's status and error.
    ``call_attempts`` bounds the tries of each GET inside the run (1: the caller retries the run).
    """
    reconciler = Reconciler(
        factory,
        client,
        workers=workers,
        on_progress=on_progress,
        stop=stop,
        clock_ms=clock_ms,
        stale_after_ms=stale_after_ms,
        call_attempts=call_attempts,
    )
    return reconciler.run(organization)


def reconcile_task_body(
    factory: sessionmaker[Session],
    clients: PerProcess[ClerkClient],
    organization: str | None,
    *,
    call_attempts: int = CALL_ATTEMPTS,
) -> dict[str, Any] | None:
    """What the Celery tasks run: a run, or None when it cannot or need not run now.

    A transient failure looking the organization up raises (``RetryableError``); one during
    the run ends it ``interrupted``: either way the task may try again later.
    """
    try:
        client = clients.get()
    except ConfigError as exc:
        log.error("reconciliation skipped: %s", exc)
        return None
    try:
        result = run_reconcile(factory, client, organization=organization, call_attempts=call_attempts)
    except SyncBusyError as exc:
        log.info("reconciliation skipped: %s", exc)
        return None
    except OrganizationNotFoundError as exc:
        log.info("reconciliation skipped: %s", exc)
        return None
    repaired = {
        kind: {action: n for action, n in actions.items() if n}
        for kind, actions in result.drift.as_dict().items()
        if any(actions.values())
    }
    log.info(
        "reconciliation run %d %s: %d organizations, %d rows, %d API calls, drift %s",
        result.run_id,
        result.status,
        result.organizations,
        result.rows,
        result.api_calls,
        repaired,
    )
    return result.as_dict()
