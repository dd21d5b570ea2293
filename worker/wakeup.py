"""kombu's SQLAlchemy transport, woken by the processes that publish instead of only polling.

The embedded default's broker is a SQLite file read by kombu's SQLAlchemy transport, which
finds new messages by polling once a second: a delivery could wait that long in the queue
before a worker even saw it, and so could the next task after each one finished. Raising the
polling rate would cost CPU while idle. Instead, every consumer process binds a datagram
socket per queue it consumes in a directory beside the broker's database; every publisher
(the web process, a worker retrying a task, beat) sends one byte to the consumers of the queue
after its message is committed, and a consumer wakes up on its own socket when it acknowledges
a message (its pool has room again). The poll interval stays as the fallback, so a lost
wake-up (a full socket buffer, a consumer on another machine, no room for the directory) only
means the old delay, never lost work: the message is in the database either way.

The broker's SQLite file is set up like the mirror's (WAL, no fsync per commit), and the
transport deletes a message when it hands it to a consumer, where kombu's marks it
invisible and keeps it forever: invisible rows are never read again (kombu re-publishes
unacknowledged messages it still holds when a channel closes), but they slowed every poll
down as the table grew. Invisible rows left by earlier versions are deleted once per channel.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import socket
import threading
from json import loads
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.transport import sqlalchemy as kombu_sqla
from kombu.utils.encoding import bytes_to_str
from sqlalchemy import create_engine, delete, event, text

log = logging.getLogger(__name__)

TRANSPORT = f"{__name__}:Transport"
# Transport options that are ours or kombu's, never create_engine's.
NOT_ENGINE_OPTIONS = frozenset(
    {
        "queue_tablename",
        "message_tablename",
        "callback",
        "errback",
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "retry_errors",
        "polling_interval",
        "wake_dir",
    }
)
# Queue names that can be part of a file name; others are only polled.
_SAFE_QUEUE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SUFFIX = ".sock"
# AF_UNIX paths are limited to 108 bytes on Linux, the terminating NUL included.
_MAX_SOCKET_PATH = 107


def wake_dir_for(broker_url: str) -> Path | None:
    """Where the consumers of a ``sqla+sqlite:///`` broker listen: beside its file; None otherwise.

    Only a SQLite broker guarantees that publishers and consumers share one machine (and so
    one filesystem); any other broker is polled as kombu does.
    """
    prefix = "sqla+sqlite:///"
    if not broker_url.startswith(prefix):
        return None
    database = broker_url[len(prefix) :].split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    path = Path(database)
    return path.with_name(path.name + ".wake")


class Waker:
    """The wake-up sockets of one transport: bound for the queues it consumes, sent to by publishers.

    A consumer's socket is ``<queue>.<pid>.sock`` in the directory; a publisher sends to every
    such socket of the queue and removes those nobody listens on any more (a process killed
    before it could clean up). Sending never blocks: a full buffer already holds a wake-up.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._sender: socket.socket | None = None
        self._dir_fd: int | None = None
        self._listening: dict[str, socket.socket] = {}
        self._failed = False

    # -- addresses ------------------------------------------------------------------------
    def _fd(self) -> int:
        with self._lock:
            if self._dir_fd is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            return self._dir_fd

    def _address(self, name: str) -> str:
        """A path to ``name`` short enough for AF_UNIX: through the directory's descriptor if need be."""
        full = str(self.directory / name)
        if len(full.encode()) <= _MAX_SOCKET_PATH:
            return full
        return f"/proc/self/fd/{self._fd()}/{name}"

    @staticmethod
    def _listeners(names: list[str], queue: str) -> list[str]:
        prefix = queue + "."
        return [
            name
            for name in names
            if name.startswith(prefix)
            and name.endswith(_SUFFIX)
            and name[len(prefix) : -len(_SUFFIX)].isdigit()
        ]

    # -- publishers -----------------------------------------------------------------------
    def notify(self, queue: str) -> None:
        """Wake the consumers of ``queue`` on this machine; never raises."""
        if not _SAFE_QUEUE.match(queue):
            return
        try:
            names = self._listeners(os.listdir(self._fd()), queue)
            if not names:
                return
            sender = self._socket()
            for name in names:
                self._send(sender, name)
        except OSError as exc:
            # The poll interval covers it; say so once, not at every message.
            if not self._failed:
                self._failed = True
                log.warning("broker wake-ups unavailable in %s (%s); polling only", self.directory, exc)

    def _socket(self) -> socket.socket:
        with self._lock:
            if self._sender is None:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.setblocking(False)
            return self._sender

    def _send(self, sender: socket.socket, name: str) -> None:
        try:
            sender.sendto(b"!", self._address(name))
        except (BlockingIOError, InterruptedError):
            pass  # its buffer is full of wake-ups already
        except ConnectionRefusedError:
            # Bound by a process that is gone: nobody will read it again.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)
        except FileNotFoundError:
            pass  # removed meanwhile

    # -- consumers ------------------------------------------------------------------------
    def listen(self, queues: list[str]) -> None:
        """Bind a socket for each of ``queues`` not bound yet (before polling them: no wake-up is missed)."""
        for queue in queues:
            if queue in self._listening or not _SAFE_QUEUE.match(queue):
                continue
            try:
                self._listening[queue] = self._bind(f"{queue}.{os.getpid()}{_SUFFIX}")
            except OSError as exc:
                if not self._failed:
                    self._failed = True
                    log.warning("broker wake-ups unavailable in %s (%s); polling only", self.directory, exc)

    def _bind(self, name: str) -> socket.socket:
        self._fd()  # the directory exists from here on
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            address = self._address(name)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                # Left by a dead process that had our pid.
                os.unlink(self.directory / name)
                sock.bind(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def wait(self, timeout: float) -> bool:
        """Sleep until a wake-up arrives or ``timeout`` passes; True if woken."""
        sockets = list(self._listening.values())
        if not sockets:
            if timeout > 0:
                select.select([], [], [], timeout)
            return False
        readable, _, _ = select.select(sockets, [], [], max(0.0, timeout))
        for sock in readable:
            # Wake-ups that arrived together count as one: the poll that follows sees every message.
            with contextlib.suppress(OSError):
                while sock.recv(64):
                    pass
        return bool(readable)

    def wake_self(self) -> None:
        """Cut this consumer's current wait short (its pool has room for another message)."""
        # One of our sockets is enough: the wait watches all of them.
        queue = next(iter(list(self._listening)), None)
        if queue is not None:
            self._send(self._socket(), f"{queue}.{os.getpid()}{_SUFFIX}")

    def close(self) -> None:
        """Close the sockets; remove our files only in the process that bound them (not a fork)."""
        owner = os.getpid() == self._pid
        for queue, sock in list(self._listening.items()):
            sock.close()
            if owner:
                with contextlib.suppress(OSError):
                    os.unlink(self.directory / f"{queue}.{self._pid}{_SUFFIX}")
        self._listening.clear()
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if self._dir_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._dir_fd)
            self._dir_fd = None


class Channel(kombu_sqla.Channel):
    """kombu's SQLAlchemy channel that wakes consumers after a publish and deletes what it delivers."""

    _swept = False

    def _engine_from_config(self) -> Any:
        conninfo = self.connection.client
        options = {
            key: value for key, value in conninfo.transport_options.items() if key not in NOT_ENGINE_OPTIONS
        }
        if not str(conninfo.hostname).startswith("sqlite"):
            return create_engine(conninfo.hostname, **options)
        # As the mirror's SQLite file (models.db): WAL, so that readers never wait for the
        # writer, and no fsync per commit. A message lost to a power cut is only a wake-up:
        # the inbox row it pointed to is durable, and the sweeper enqueues it again.
        options.setdefault("connect_args", {"timeout": 30})
        engine = create_engine(conninfo.hostname, **options)

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super()._put(queue, payload, **kwargs)  # type: ignore[no-untyped-call]
        # After the commit: a woken consumer must find the message.
        waker = getattr(self.connection, "waker", None)
        if waker is not None:
            waker.notify(queue)

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        obj = self._get_or_create(queue)  # type: ignore[no-untyped-call]
        session = self.session
        message_cls = self.message_cls
        if not self._swept:
            self._swept = True
            # Rows earlier versions marked invisible: never read again, only slowing the polls.
            session.execute(delete(message_cls.__table__).where(message_cls.visible.is_(False)))
            session.commit()
        if session.bind.name == "sqlite":
            session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            message = (
                session.query(message_cls)
                .with_for_update()
                .filter(message_cls.queue_id == obj.id)
                .filter(message_cls.visible.isnot(False))
                .order_by(message_cls.sent_at, message_cls.id)
                .limit(1)
                .first()
            )
            if message is None:
                raise Empty()
            payload = loads(bytes_to_str(message.payload))  # type: ignore[no-untyped-call]
            session.delete(message)
            return payload
        finally:
            session.commit()

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)  # type: ignore[no-untyped-call]
        self._room()

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]
        self._room()

    def _room(self) -> None:
        # Called from the pool's result thread: the consumer may be waiting with a full prefetch.
        waker = getattr(self.connection, "waker", None)
        if waker is not None:
            waker.wake_self()


class Transport(kombu_sqla.Transport):
    """The SQLAlchemy transport whose consumers wait on wake-up sockets between polls."""

    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)  # type: ignore[no-untyped-call]
        directory = client.transport_options.get("wake_dir")
        self.waker: Waker | None = Waker(Path(directory)) if directory else None

    def drain_events(self, connection: Any, timeout: float | None = None, **_: Any) -> None:
        """kombu's loop, waiting on the wake-up sockets instead of sleeping between polls."""
        started = monotonic()
        waker = self.waker
        while True:
            if waker is not None:
                waker.listen([queue for channel in self.channels for queue in channel._active_queues])
            try:
                self.cycle.get(self._deliver, timeout=timeout)  # type: ignore[union-attr]
                return
            except Empty:
                pass
            pause = self.polling_interval
            if timeout is not None:
                left = timeout - (monotonic() - started)
                if left <= 0:
                    raise TimeoutError()
                pause = min(pause, left)
            if waker is not None:
                waker.wait(pause)
            else:
                select.select([], [], [], pause)

    def close_connection(self, connection: Any) -> None:
        try:
            super().close_connection(connection)  # type: ignore[no-untyped-call]
        finally:
            if self.waker is not None:
                self.waker.close()
