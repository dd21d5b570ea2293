"""Group commit for the inbox: deliveries arriving together share one insert and one commit.

Each request thread hands its classified row to the process's ``GroupCommitter`` and waits.
One committer thread takes everything queued, stores it with one statement (PostgreSQL) or
one transaction (SQLite), and only then wakes each waiting request with its own outcome: no
delivery is answered before the commit that holds it. There is no batching delay: while one
batch is being committed the next one gathers, so batches grow with the load and a lone
request pays one round trip, as before.

On PostgreSQL the batch is one autocommitted multi-row ``INSERT ... ON CONFLICT DO NOTHING``
on a pooled DB-API connection: one round trip, one fsync and no SQLAlchemy statement machinery
for the whole batch. The pool checkout keeps the engine's bounds (``ORGSYNC_DB_TIMEOUT``: pool
wait, statement timeout, connection hold), so a database that is down or hanging fails the
batch, and each request in it is answered 503, within those bounds. ``InboxWriter`` keeps that
connection (in autocommit, with its cursor) across back-to-back batches for a fraction of the
hold bound, and gives it back whenever the committer has nothing queued: under load a batch
then costs no pool checkout, checkin, watchdog arming or autocommit switching.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from sqlalchemy import Engine

from models.db import is_connection_error
from models.errors import PermanentError, RetryableError
from models.inbox import InboxRow, Stored, store_row, store_rows_postgres
from models.tables import InboxStatus

logger = logging.getLogger(__name__)

# Rows per statement: bounds the statement's size (bodies are up to max_body_bytes each).
MAX_BATCH = 64

StoreBatch = Callable[[Engine, Sequence[InboxRow]], list[Stored | RetryableError]]
Committed = Callable[[list[int]], None]


class DatabaseUnavailableError(RetryableError):
    """The batch holding a delivery could not be committed for a reason worth retrying."""


class CommitTimeoutError(DatabaseUnavailableError):
    """No commit within the request's bound (the database hangs, or a batch ahead of it does)."""


class BatchFailedError(PermanentError):
    """The batch failed unexpectedly (a bug); the committer logged it with its traceback."""


class _Waiter:
    """One request's row and, once its batch is done, its outcome. ``done`` is released then."""

    __slots__ = ("done", "error", "row", "stored")

    def __init__(self, row: InboxRow) -> None:
        self.row = row
        self.stored: Stored | None = None
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()


def store_batch(engine: Engine, rows: Sequence[InboxRow]) -> list[Stored | RetryableError]:
    """Store ``rows`` in one commit: one statement on PostgreSQL, one transaction on SQLite."""
    if engine.dialect.name == "postgresql":
        writer = InboxWriter(engine, hold_s=0.0)
        try:
            return writer(engine, rows)
        finally:
            writer.release()
    results: list[Stored | RetryableError] = []
    with engine.begin() as connection:
        for row in rows:
            try:
                results.append(store_row(connection, row))
            except RetryableError as exc:
                results.append(exc)
    return results


class InboxWriter:
    """``store_batch`` for the committer thread, keeping its pooled connection between batches.

    On PostgreSQL the connection checked out for a batch stays checked out, in autocommit with
    one cursor, for the batches that follow, until ``release()`` (the committer calls it when
    nothing is queued) or until it has been held ``hold_s`` seconds; then it goes back to the
    pool and the next batch checks one out afresh. ``hold_s`` must stay well under the
    engine's hold bound (``models.db``: a connection held longer is cut). A failed batch gives
    its connection back at once (invalidated when the connection itself failed). Other
    databases are handed to ``store_batch``. Used from one thread at a time.
    """

    def __init__(self, engine: Engine, *, hold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._postgres = engine.dialect.name == "postgresql"
        self._hold_s = hold_s
        self._clock = clock
        self._held: Any = None  # the pool's connection proxy
        self._cursor: Any = None
        self._since = 0.0
        self._pid = 0

    @property
    def holding(self) -> bool:
        return self._held is not None

    def __call__(self, engine: Engine, rows: Sequence[InboxRow]) -> list[Stored | RetryableError]:
        if not self._postgres:
            return store_batch(engine, rows)
        if self._held is not None and self._pid != os.getpid():
            # Held by the parent of this forked process: never used, closed or returned here.
            self._held = self._cursor = None
        if self._held is not None and self._clock() - self._since >= self._hold_s:
            self.release()
        if self._held is None:
            # A DB-API connection from the engine's pool: its checkout arms the hold bound.
            proxied = engine.raw_connection()
            try:
                dbapi: Any = proxied.dbapi_connection
                # One statement is the whole transaction: committed by the server before it answers.
                dbapi.autocommit = True
                self._cursor = dbapi.cursor()
            except BaseException:
                proxied.invalidate()
                proxied.close()
                raise
            self._held = proxied
            self._since = self._clock()
            self._pid = os.getpid()
        try:
            return store_rows_postgres(self._cursor, rows)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            # Lost, cut, timed out or closed: never hand this connection out again.
            proxied, self._held, self._cursor = self._held, None, None
            proxied.invalidate()
            proxied.close()
            raise
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the held connection back to the pool (as the pool lent it: not in autocommit)."""
        proxied, cursor = self._held, self._cursor
        if proxied is None or self._pid != os.getpid():
            self._held = self._cursor = None
            return
        self._held = self._cursor = None
        try:
            cursor.close()
            if not proxied.dbapi_connection.closed:
                proxied.dbapi_connection.autocommit = False
        except psycopg.Error:
            proxied.invalidate()
        finally:
            proxied.close()


def is_unavailable(exc: BaseException) -> bool:
    """Failures that mean "the database cannot take this now": answered 503, retried by Svix."""
    return isinstance(
        exc, RetryableError | psycopg.OperationalError | psycopg.InterfaceError
    ) or is_connection_error(exc)


class GroupCommitter:
    """Stores rows handed in by many request threads, a batch per commit, from one thread.

    ``store(engine, rows)`` does the storing (``store_batch``, or an ``InboxWriter``);
    ``committed(ids)`` is called on the committer thread after each commit with the ids of
    newly stored pending rows (the dispatcher's ``submit``); ``idle()`` is called on the
    committer thread whenever it finds nothing queued, before it waits (``InboxWriter.release``).
    ``wait_bound`` (seconds, None for no bound) caps how long a request waits for its commit.

    The thread starts on first use in the process that serves requests; an instance built
    before a fork starts afresh in the child.
    """

    def __init__(
        self,
        engine: Engine,
        store: StoreBatch,
        *,
        committed: Committed | None = None,
        wait_bound: float | None = None,
        max_batch: int = MAX_BATCH,
        idle: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._on_idle = idle
        self._committed = committed
        self._wait_bound = wait_bound
        self._max_batch = max_batch
        self._init_state()
        reference = weakref.ref(self)

        def _after_fork() -> None:
            committer = reference()
            if committer is not None:
                committer._init_state()

        os.register_at_fork(after_in_child=_after_fork)

    def _init_state(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Waiter] = []
        self._idle = False  # the thread waits for work: a submit must wake it
        self._closed = False
        self._thread: threading.Thread | None = None

    def commit(self, row: InboxRow) -> Stored:
        """Store ``row`` in the next batch and return once that batch is committed.

        Raises ``RetryableError`` (``DatabaseUnavailableError`` for the database itself) when
        it could not be stored for now, ``BatchFailedError`` when its batch failed otherwise.
        """
        waiter = _Waiter(row)
        with self._cond:
            if self._closed:
                raise DatabaseUnavailableError("the web process is shutting down")
            self._queue.append(waiter)
            if self._thread is None:
                self._start()
            elif self._idle:
                self._idle = False
                self._cond.notify()
        bound = self._wait_bound
        if not waiter.done.acquire(timeout=-1 if bound is None else bound):
            with self._cond:
                if waiter in self._queue:
                    self._queue.remove(waiter)
            # Taken into a batch that may still commit: the redelivery will find it then.
            raise CommitTimeoutError(f"not committed within {bound:.1f} s")
        error = waiter.error
        if error is not None:
            # A fresh exception per request: the batch's one is shared by other threads.
            if isinstance(error, RetryableError):
                raise RetryableError(str(error))
            if is_unavailable(error):
                raise DatabaseUnavailableError(f"database unavailable: {type(error).__name__}")
            raise BatchFailedError("storing the delivery failed")
        assert waiter.stored is not None
        return waiter.stored

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the thread; later commits are refused (503)."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(timeout)

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="orgsync-inbox-committer", daemon=True)
        self._thread = thread
        thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    batch = self._take()
                if not batch:
                    # Outside the lock: requests queue meanwhile and form the next batch.
                    self._idle_now()
                    with self._cond:
                        while not self._queue:
                            if self._closed:
                                return
                            self._idle = True
                            self._cond.wait()
                        self._idle = False
                        batch = self._take()
                self._commit(batch)
        finally:
            self._idle_now()

    def _take(self) -> list[_Waiter]:
        batch = self._queue[: self._max_batch]
        del self._queue[: self._max_batch]
        return batch

    def _idle_now(self) -> None:
        if self._on_idle is None:
            return
        try:
            self._on_idle()
        except Exception:  # a connection that cannot be given back is the pool's to replace
            logger.exception("the inbox committer's idle step failed")

    def _commit(self, batch: list[_Waiter]) -> None:
        try:
            results = self._store(self._engine, [waiter.row for waiter in batch])
        except BaseException as exc:
            if not is_unavailable(exc):
                logger.exception("storing a batch of %d deliveries failed", len(batch))
            for waiter in batch:
                waiter.error = exc
                waiter.done.release()
            return
        pending: list[int] = []
        for waiter, result in zip(batch, results, strict=True):
            if isinstance(result, Stored):
                waiter.stored = result
                if not result.duplicate and result.status == InboxStatus.PENDING:
                    pending.append(result.inbox_id)
            else:
                waiter.error = result
            waiter.done.release()
        # Strictly after the commit: a worker must find the rows it is told about.
        if pending and self._committed is not None:
            try:
                self._committed(pending)
            except Exception:  # the rows are stored: the sweeper enqueues them if this fails
                logger.exception("handing %d committed ids on failed", len(pending))
