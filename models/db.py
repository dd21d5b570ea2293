"""Engine and session factories: one engine per process, one session per request or task."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models.errors import RetryableError

# Any number works; it only has to be the same in every process that applies events.
APPLY_LOCK_KEY = 0x6F7267_73796E63


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    return url.get_backend_name() == "sqlite"


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    """Create the process's engine; SQLite gets WAL, a busy timeout and immediate transactions."""
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
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


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
    """True for failures worth retrying: unreachable server, dropped connection, lock timeout."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


# An upsert rather than an update: the row is absent from a fresh or truncated database.
_BUMP_GENERATION = text(
    "INSERT INTO mirror_state (id, generation) VALUES (1, 1) "
    "ON CONFLICT (id) DO UPDATE SET generation = mirror_state.generation + 1"
)


def lock_mirror_writes(session: Session) -> None:
    """Serialise mirror writes across processes for the rest of this transaction.

    Cascades (an organization deleted while a membership of it is written elsewhere) are
    write skew under READ COMMITTED; one writer at a time makes them plain sequential logic.
    Throughput comes from batching many events per transaction, not from parallel writers.
    SQLite already serialises writers through BEGIN IMMEDIATE.

    The mirror's generation grows in the same transaction, so a cached answer read before
    this write's commit is recognised as stale right after it (``models.permissions``); under
    the lock already, the bump adds no contention.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": APPLY_LOCK_KEY})
    session.execute(_BUMP_GENERATION)


def ping(engine: Engine) -> None:
    """Raise ``RetryableError`` unless the database answers."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise RetryableError(f"database unavailable: {type(exc.orig).__name__}") from exc
