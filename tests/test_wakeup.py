"""The embedded broker's wake-ups (worker.wakeup): publishers wake consumers, polling stays the fallback.

Real kombu connections on a SQLite broker file, each with a transport of its own as separate
processes would have. Consumers poll once an hour here, so a message that arrives at all
arrived through a wake-up; each wait is bounded, and a test never asserts how fast.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue

from worker.wakeup import TRANSPORT, Waker, wake_dir_for

# kombu's SQLAlchemy transport declares a relationship with lazy="noload", deprecated in SQLAlchemy 2.1.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
)

BOUND_S = 60.0
AN_HOUR = 3600.0
EXCHANGE = Exchange("wake-test", type="direct")


def connection(broker: Path, wake_dir: Path | None, *, polling_interval: float = AN_HOUR) -> Connection:
    options: dict[str, Any] = {"polling_interval": polling_interval}
    if wake_dir is not None:
        options["wake_dir"] = str(wake_dir)
    return Connection(f"sqlite:///{broker}", transport=TRANSPORT, transport_options=options)


def publish(broker: Path, wake_dir: Path | None, queue: str, body: str) -> None:
    """One publish from a connection of its own, as the web process would."""
    with connection(broker, wake_dir) as conn:
        Producer(conn.channel(), exchange=EXCHANGE).publish(
            body, routing_key=queue, declare=[Queue(queue, EXCHANGE, routing_key=queue)]
        )


@contextmanager
def consuming(
    broker: Path, wake_dir: Path | None, queue: str, *, polling_interval: float = AN_HOUR, prefetch: int = 0
) -> Iterator[tuple[list[Message], threading.Event, Any]]:
    """A consumer draining in a thread until stopped: (received messages, new-message event, channel)."""
    conn = connection(broker, wake_dir, polling_interval=polling_interval)
    channel = conn.channel()
    if prefetch:
        channel.basic_qos(0, prefetch, False)
    received: list[Message] = []
    arrived = threading.Event()
    stop = threading.Event()

    def on_message(_body: Any, message: Message) -> None:
        received.append(message)
        arrived.set()

    consumer = Consumer(channel, [Queue(queue, EXCHANGE, routing_key=queue)], callbacks=[on_message])
    consumer.consume()
    ready = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            ready.set()
            with suppress(TimeoutError):
                conn.drain_events(timeout=AN_HOUR)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    ready.wait(BOUND_S)
    if wake_dir is not None:
        listening = wake_dir / f"{queue}.{os.getpid()}.sock"
        deadline = time.monotonic() + BOUND_S
        while not listening.exists():
            assert time.monotonic() < deadline, f"no socket at {listening}"
            time.sleep(0.01)
    try:
        yield received, arrived, channel
    finally:
        stop.set()
        for message in received:
            if not message.acknowledged:
                message.ack()
        # A wake-up of our own ends the wait; then the loop sees stop.
        publish(broker, wake_dir, queue, "stop")
        thread.join(BOUND_S)
        conn.release()


def wait_for_messages(received: list[Message], arrived: threading.Event, count: int) -> None:
    while len(received) < count:
        assert arrived.wait(BOUND_S), f"{len(received)} of {count} messages after {BOUND_S:.0f} s"
        arrived.clear()


def message_rows(broker: Path) -> list[tuple[int, bool]]:
    with sqlite3.connect(broker) as db:
        return [(int(row[0]), bool(row[1])) for row in db.execute("SELECT id, visible FROM kombu_message")]


def test_wake_dir_only_for_a_sqlite_broker(tmp_path: Path) -> None:
    assert wake_dir_for(f"sqla+sqlite:///{tmp_path}/broker.db") == tmp_path / "broker.db.wake"
    assert wake_dir_for("sqla+sqlite:///:memory:") is None
    assert wake_dir_for("sqla+postgresql://h/db") is None
    assert wake_dir_for("redis://h:6379/0") is None


def test_a_publish_wakes_a_consumer_that_polls_hourly(tmp_path: Path) -> None:
    broker, wake = tmp_path / "broker.db", tmp_path / "broker.db.wake"
    with consuming(broker, wake, "q1") as (received, arrived, _):
        for number in range(3):
            publish(broker, wake, "q1", f"m{number}")
            wait_for_messages(received, arrived, number + 1)
        assert [message.payload for message in received] == ["m0", "m1", "m2"]
        # Delivered messages are gone from the table, not kept invisible forever.
        assert message_rows(broker) == []
    # Set up like the mirror's SQLite file: readers never wait for the writer.
    with sqlite3.connect(broker) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_only_the_consumers_of_that_queue_are_woken(tmp_path: Path) -> None:
    broker, wake = tmp_path / "broker.db", tmp_path / "broker.db.wake"
    with (
        consuming(broker, wake, "a") as (got_a, arrived_a, _),
        consuming(broker, wake, "a.b") as (got_b, _, _),
    ):
        listeners = sorted(os.listdir(wake))
        assert listeners == sorted([f"a.b.{os.getpid()}.sock", f"a.{os.getpid()}.sock"])
        publish(broker, wake, "a", "for a")
        wait_for_messages(got_a, arrived_a, 1)
        assert got_b == []
    names = ["a.1.sock", "a.b.1.sock", "a.x.sock", "a.2.sock.tmp", "b.1.sock", "a.22.sock"]
    assert Waker._listeners(names, "a") == ["a.1.sock", "a.22.sock"]


def test_an_acknowledgement_wakes_a_consumer_whose_prefetch_was_full(tmp_path: Path) -> None:
    broker, wake = tmp_path / "broker.db", tmp_path / "broker.db.wake"
    with consuming(broker, wake, "q", prefetch=1) as (received, arrived, _):
        publish(broker, wake, "q", "first")
        wait_for_messages(received, arrived, 1)
        # Published while the consumer may take nothing more: its wake-up finds no room.
        publish(broker, wake, "q", "second")
        assert [visible for _, visible in message_rows(broker)] == [True]
        received[0].ack()
        wait_for_messages(received, arrived, 2)
        assert received[1].payload == "second"


def test_without_wake_ups_polling_still_delivers(tmp_path: Path) -> None:
    # A lost wake-up (here: no directory at all) only means waiting for the next poll.
    broker = tmp_path / "broker.db"
    with consuming(broker, None, "q", polling_interval=0.05) as (received, arrived, _):
        publish(broker, None, "q", "polled")
        wait_for_messages(received, arrived, 1)


def test_a_dead_consumers_socket_is_removed_by_the_next_publisher(tmp_path: Path) -> None:
    broker, wake = tmp_path / "broker.db", tmp_path / "broker.db.wake"
    wake.mkdir()
    stale = wake / "q.999999.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(stale))
    assert stale.exists()
    with consuming(broker, wake, "q") as (received, arrived, _):
        publish(broker, wake, "q", "m")
        wait_for_messages(received, arrived, 1)
    assert not stale.exists()


def test_a_directory_too_long_for_a_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    broker, wake = tmp_path / "broker.db", deep / "broker.db.wake"
    assert len(str(wake / "q.1234567.sock")) > 108
    with consuming(broker, wake, "q") as (received, arrived, _):
        publish(broker, wake, "q", "m")
        wait_for_messages(received, arrived, 1)


def test_invisible_rows_of_earlier_versions_are_deleted(tmp_path: Path) -> None:
    broker, wake = tmp_path / "broker.db", tmp_path / "broker.db.wake"
    publish(broker, wake, "q", "old")
    publish(broker, wake, "q", "new")
    with sqlite3.connect(broker) as db:
        # What kombu's own transport leaves behind for each message it delivered.
        db.execute("UPDATE kombu_message SET visible = 0 WHERE id = (SELECT min(id) FROM kombu_message)")
    with consuming(broker, wake, "q") as (received, arrived, _):
        wait_for_messages(received, arrived, 1)
        assert [message.payload for message in received] == ["new"]
        assert message_rows(broker) == []


def test_a_waker_closed_in_a_forked_child_leaves_the_parents_socket(tmp_path: Path) -> None:
    waker = Waker(tmp_path / "wake")
    waker.listen(["q"])
    path = tmp_path / "wake" / f"q.{os.getpid()}.sock"
    assert path.exists()
    pid = os.fork()
    if pid == 0:  # the child: what a prefork pool process inherits
        waker.close()
        os._exit(0)
    os.waitpid(pid, 0)
    assert path.exists()
    waker.close()
    assert not path.exists()
