"""Engine and session factories: one engine per process, one session per request or task."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from models.errors import RetryableError
from models.settings import parse_db_schema

log = logging.getLogger(__name__)

# Any number works; it only has to be the same in every process that applies events.
APPLY_LOCK_KEY = 0x6F7267_73796E63
# Bounds for every PostgreSQL connection, whatever the process. A statement may legitimately
# run long in the worker (a big batch, a wait on the mirror lock), so only processes that pass
# ``timeout`` get a statement timeout; these only turn a dead peer into an error.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Data the server never acknowledges, and an idle connection whose keepalive probes go
# unanswered (30 s idle, then 3 probes 10 s apart), end the connection instead of a hang.
DEFAULT_TCP_USER_TIMEOUT_S = 30.0
_CUT = "orgsync_cut"
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    return url.get_backend_name() == "sqlite"


def db_schema(environ: Mapping[str, str] | None = None) -> str:
    """orgsync's PostgreSQL schema: ``ORGSYNC_DB_SCHEMA``, checked, or ``orgsync``."""
    env = os.environ if environ is None else environ
    return parse_db_schema(env.get("ORGSYNC_DB_SCHEMA", ""))


def create_db_engine(
    url: str, *, timeout: float | None = None, schema: str | None = None, **kwargs: Any
) -> Engine:
    """Create the process's engine; SQLite gets WAL, a busy timeout and immediate transactions.

    PostgreSQL connections always get a connect timeout and TCP keepalives. ``timeout`` (seconds,
    for processes that answer requests) also bounds the wait for a pooled connection, each
    statement on the server, and how long a connection may be held at all: past that its
    socket is shut down, so that a server that accepted the connection but never answers (a
    stuck proxy) fails the caller with ``OperationalError`` instead of hanging it. ``timeout``
    does not apply to SQLite, whose busy timeout already bounds waiting for the one writer.

    On PostgreSQL every connection's ``search_path`` is orgsync's own schema (``schema``, by
    default ``ORGSYNC_DB_SCHEMA`` or ``orgsync``), and only it: every unqualified name in
    orgsync's queries and migrations, the alembic version table included, resolves there and
    never to an application's table of the same name in ``public``. It is sent as a startup
    option, so it costs no round trip. The schema is created by the migrations
    (``models.migrations.env``).
    """
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            # pysqlite's implicit BEGIN is deferred: a transaction that reads and then writes
            # can fail at once with "database is locked" instead of waiting. We emit
            # BEGIN IMMEDIATE ourselves so writers queue on the busy timeout instead.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # No pre-ping: it costs a round trip per checkout on the hot intake path. A connection that
    # went stale fails its statement, is invalidated, and the caller retries (503 or task retry).
    kwargs.setdefault("pool_recycle", 1800)
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
    bounds: dict[str, Any] = {
        # libpq counts whole seconds and treats anything under 2 as 2.
        "connect_timeout": max(2, math.ceil(timeout if timeout is not None else DEFAULT_CONNECT_TIMEOUT_S)),
        "tcp_user_timeout": int((timeout if timeout is not None else DEFAULT_TCP_USER_TIMEOUT_S) * 1000),
        **_KEEPALIVES,
    }
    options = f"-c search_path={schema or db_schema()}"
    if timeout is not None:
        options += f" -c statement_timeout={int(timeout * 1000)}"
        kwargs.setdefault("pool_timeout", timeout)
    # Added to any options the URL carries, which connect_args would otherwise replace.
    given = make_url(url).query.get("options")
    bounds["options"] = f"{given} {options}" if isinstance(given, str) else options
    kwargs["connect_args"] = {**bounds, **kwargs.get("connect_args", {})}
    engine = create_engine(url, **kwargs)
    if timeout is not None:
        _hold_at_most(engine, timeout)
    return engine


def _hold_at_most(engine: Engine, seconds: float) -> None:
    """Shut down the socket of any connection checked out for longer than ``seconds``.

    statement_timeout is enforced by the server, so it cannot help when the server never got
    the statement (a proxy that accepts and then forwards nothing); libpq waits for an answer
    forever then. Shutting the socket down wakes the waiting thread with a connection error,
    and the pool discards the connection.
    """
    watchdog = _Watchdog(seconds)
    held: dict[int, int] = {}

    @event.listens_for(engine, "checkout")
    def _arm(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if record.info.pop(_CUT, False):
            # Cut while held, by a holder that then saw no error (it had nothing left to send):
            # the pool discards it and checks out another.
            raise DisconnectionError("connection was cut after outliving its deadline")
        held[id(record)] = watchdog.arm(dbapi_connection)

    @event.listens_for(engine, "checkin")
    def _disarm(_dbapi_connection: Any, record: Any) -> None:
        token = held.pop(id(record), None)
        if token is not None and not watchdog.disarm(token):
            record.info[_CUT] = True


class _Watchdog:
    """One thread per engine that cuts connections held past their deadline.

    Every deadline is "now + seconds", so they expire in the order they were armed and the
    thread only ever waits for the oldest one.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._condition = threading.Condition()
        self._armed: dict[int, tuple[float, Any]] = {}
        self._next_token = 0
        self._thread: threading.Thread | None = None

    def arm(self, dbapi_connection: Any) -> int:
        with self._condition:
            if self._thread is None or not self._thread.is_alive():
                # Started on first use, so in the process that uses the engine (after any fork).
                self._thread = threading.Thread(target=self._run, name="orgsync-db-deadline", daemon=True)
                self._thread.start()
            self._next_token += 1
            token = self._next_token
            if not self._armed:
                self._condition.notify()
            self._armed[token] = (time.monotonic() + self.seconds, dbapi_connection)
            return token

    def disarm(self, token: int) -> bool:
        """False when it is too late: the connection was cut."""
        with self._condition:
            return self._armed.pop(token, None) is not None

    def _run(self) -> None:
        with self._condition:
            while True:
                if not self._armed:
                    self._condition.wait()
                    continue
                token, (deadline, dbapi_connection) = next(iter(self._armed.items()))
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                del self._armed[token]
                # Under the lock: the connection cannot be checked in (and reused) meanwhile.
                if _cut(dbapi_connection):
                    log.warning("a database connection was held over %.1f s: cut", self.seconds)


def _cut(dbapi_connection: Any) -> bool:
    """Shut the connection's socket down; a closed connection has no socket left to cut."""
    if getattr(dbapi_connection, "closed", True):
        return False
    try:
        # A duplicate descriptor: shutdown acts on the socket both share, and closing the
        # duplicate leaves libpq's own descriptor for libpq to close.
        duplicate = os.dup(dbapi_connection.fileno())
    except Exception:
        return False
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)
        return False
    with sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
    return True


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """The one place that commits: lower code only flushes. Connection failures become retryable."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException as exc:
        session.rollback()
        if is_connection_error(exc):
            raise RetryableError(f"database unavailable: {type(exc.__cause__ or exc).__name__}") from exc
        raise
    finally:
        session.close()


def is_connection_error(exc: BaseException) -> bool:
    """True for failures worth retrying: unreachable server, dropped connection, lock or pool timeout."""
    if isinstance(exc, OperationalError | PoolTimeoutError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


# The generation is the SUM of ``mirror_state.generation`` over its rows, its "slots": each
# writing transaction adds one to a slot no other transaction holds (SKIP LOCKED), so writers
# never queue on one hot row, while the sum still moves exactly when a writer commits (a
# reader's statement sees all of a commit or none of it). Slots are created as needed, so
# there are as many as writers ever ran at once; the id of a new one is the backend's pid,
# which no concurrent transaction shares.
_BUMP_FREE_SLOT = text(
    "UPDATE mirror_state SET generation = mirror_state.generation + 1 FROM ("
    "SELECT id FROM mirror_state ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) AS slot "
    "WHERE mirror_state.id = slot.id"
)
_BUMP_NEW_SLOT = text(
    "INSERT INTO mirror_state (id, generation) VALUES (pg_backend_pid(), 1) "
    "ON CONFLICT (id) DO UPDATE SET generation = mirror_state.generation + 1"
)
# SQLite has one writer at a time: one slot.
_BUMP_ONE_SLOT = text(
    "INSERT INTO mirror_state (id, generation) VALUES (1, 1) "
    "ON CONFLICT (id) DO UPDATE SET generation = mirror_state.generation + 1"
)
# What the current transaction of a session locked, in ``session.info``: (transaction, lock).
_HELD = "orgsync_mirror_lock"
# Advisory lock key spaces (pg_advisory_xact_lock(int4, int4) never meets the bigint one).
_ORGANIZATION_SPACE = 0x6F7267  # "org"


@dataclass(frozen=True)
class MirrorLock:
    """What a transaction may write in the mirror: everything, or only these organizations'
    rows (the organization, its memberships, invitations and domains)."""

    organizations: frozenset[str] | None

    @property
    def everything(self) -> bool:
        return self.organizations is None

    def covers(self, other: MirrorLock) -> bool:
        if self.organizations is None:
            return True
        return other.organizations is not None and other.organizations <= self.organizations


EVERYTHING = MirrorLock(None)


def lock_mirror_writes(session: Session) -> MirrorLock:
    """Lock the whole mirror for the rest of this transaction: no other mirror writer runs.

    For writes whose effects cross organizations: users (their copies and cascades reach
    every organization), roles and permissions (their copies reach every holder), reads
    that must see the mirror still (reconciliation counting drift, the rules).
    ``lock_organizations`` is the scalable path for writes confined to organizations.
    SQLite already serialises writers through BEGIN IMMEDIATE.
    """
    return _lock(session, EVERYTHING, wait=True)


def lock_organizations(session: Session, organization_ids: Iterable[str], *, wait: bool = True) -> MirrorLock:
    """Lock these organizations' mirror rows for the rest of this transaction; returns what it got.

    Writers of different organizations run in parallel: the whole-mirror lock is taken
    SHARED, then one exclusive advisory lock per organization. With ``wait`` every lock is
    waited for, in one fixed order (sorted keys), so two such transactions never deadlock;
    without it none is waited for (a busy organization is left out of the result, which
    may be empty) and no deadlock can involve it either. On SQLite this is the whole mirror.
    """
    wanted = MirrorLock(frozenset(organization_ids))
    if session.get_bind().dialect.name != "postgresql":
        return _lock(session, EVERYTHING, wait=True)
    return _lock(session, wanted, wait=wait)


def held_mirror_lock(session: Session) -> MirrorLock | None:
    """What the session's current transaction locked, or None."""
    held = session.info.get(_HELD)
    if held is None or held[0] is not session.get_transaction():
        return None
    return cast(MirrorLock, held[1])


def organization_lock_key(organization_id: str) -> int:
    """The advisory lock of an organization (a shared key only costs parallelism, never safety)."""
    digest = hashlib.blake2b(organization_id.encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _lock(session: Session, wanted: MirrorLock, *, wait: bool) -> MirrorLock:
    held = held_mirror_lock(session)
    if held is not None:
        if held.covers(wanted):
            return wanted
        # Taking more locks later would break the one order that keeps writers deadlock-free.
        raise RuntimeError("a mirror lock cannot be widened within a transaction")
    postgres = session.get_bind().dialect.name == "postgresql"
    # The slot first: taking it does not wait (other writers' slots are skipped), and others
    # skip this one while this transaction waits for the locks below.
    _bump_generation(session, postgres=postgres)
    got = wanted
    if postgres and wanted.organizations is None:
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": APPLY_LOCK_KEY})
    elif postgres and wanted.organizations is not None:
        session.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": APPLY_LOCK_KEY})
        keys = sorted({organization_lock_key(org) for org in wanted.organizations})
        if wait:
            # One statement; unnest yields the array in order, so the locks are taken in order.
            session.execute(
                text(
                    "SELECT count(pg_advisory_xact_lock(:space, key)) "
                    "FROM unnest(CAST(:keys AS integer[])) AS key"
                ),
                {"space": _ORGANIZATION_SPACE, "keys": keys},
            )
        else:
            taken = set(
                session.scalars(
                    text(
                        "SELECT key FROM unnest(CAST(:keys AS integer[])) AS key "
                        "WHERE pg_try_advisory_xact_lock(:space, key)"
                    ),
                    {"space": _ORGANIZATION_SPACE, "keys": keys},
                )
            )
            got = MirrorLock(
                frozenset(org for org in wanted.organizations if organization_lock_key(org) in taken)
            )
    session.info[_HELD] = (session.get_transaction(), got)
    return got


def _bump_generation(session: Session, *, postgres: bool) -> None:
    """Grow the mirror's generation in this transaction (``models.permissions`` reads it): a
    cached answer read before this transaction commits is recognised as stale right after."""
    if not postgres:
        session.execute(_BUMP_ONE_SLOT)
        return
    result = session.execute(_BUMP_FREE_SLOT)
    if not cast(Any, result).rowcount:
        session.execute(_BUMP_NEW_SLOT)


def ping(engine: Engine) -> None:
    """Raise ``RetryableError`` unless the database answers."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise RetryableError(f"database unavailable: {type(exc.orig).__name__}") from exc
    except PoolTimeoutError as exc:
        raise RetryableError("database unavailable: no connection free in time") from exc
