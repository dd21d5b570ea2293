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
batch, and each request in it is answered 503, within those bounds.
"""

from __future__ import annotations

import logging
import os
import threading
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
        return _store_postgres(engine, rows)
    results: list[Stored | RetryableError] = []
    with engine.begin() as connection:
        for row in rows:
            try:
                results.append(store_row(connection, row))
            except RetryableError as exc:
                results.append(exc)
    return results


def _store_postgres(engine: Engine, rows: Sequence[InboxRow]) -> list[Stored | RetryableError]:
    # A DB-API connection from the engine's pool: its checkout arms the engine's hold bound.
    proxied = engine.raw_connection()
    dbapi: Any = proxied.dbapi_connection
    try:
        # One statement is the whole transaction: committed by the server before it answers.
        dbapi.autocommit = True
        with dbapi.cursor() as cursor:
            results = store_rows_postgres(cursor, rows)
        dbapi.autocommit = False
    except (psycopg.OperationalError, psycopg.InterfaceError):
        # Lost, cut, timed out or closed: never hand this connection out again.
        proxied.invalidate()
        raise
    finally:
        proxied.close()
    return results


def is_unavailable(exc: BaseException) -> bool:
    """Failures that mean "the database cannot take this now": answered 503, retried by Svix."""
    return isinstance(
        exc, RetryableError | psycopg.OperationalError | psycopg.InterfaceError
    ) or is_connection_error(exc)


class GroupCommitter:
    """Stores rows handed in by many request threads, a batch per commit, from one thread.

    ``store(engine, rows)`` does the storing (``store_batch``); ``committed(ids)`` is called on
    the committer thread after each commit with the ids of newly stored pending rows (the
    dispatcher's ``submit``). ``wait_bound`` (seconds, None for no bound) caps how long a
    request waits for its commit.

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
    ) -> None:
        self._engine = engine
        self._store = store
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
        while True:
            with self._cond:
                while not self._queue:
                    if self._closed:
                        return
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
            self._commit(batch)

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
