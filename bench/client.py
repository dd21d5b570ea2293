"""The load client: prebuilt HTTP/1.1 requests over keep-alive connections, closed loop or paced."""

from __future__ import annotations

import array
import contextlib
import json
import multiprocessing
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class Connection:
    """One keep-alive connection: writes prebuilt requests, reads responses by Content-Length."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reconnects = 0
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def roundtrip(self, request: bytes) -> int:
        try:
            return self._roundtrip(request)
        except (ConnectionError, TimeoutError):
            # The server closed an idle keep-alive connection; a resent delivery is at worst a
            # duplicate, which both servers acknowledge.
            self.close()
            self.reconnects += 1
            self._connect()
            return self._roundtrip(request)

    def _roundtrip(self, request: bytes) -> int:
        self.sock.sendall(request)
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._fill()
        head = self.buf[:end].decode("latin-1")
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            lowered = name.strip().lower()
            if lowered == "content-length":
                length = int(value)
            elif lowered == "connection" and value.strip().lower() == "close":
                close = True
        total = end + 4 + length
        while len(self.buf) < total:
            self._fill()
        self.buf = self.buf[total:]
        if close:
            self.close()
            self._connect()
        return status

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk


@dataclass
class LoadResult:
    """Per request (by index): status (0 = not sent), scheduled, sent and answered times in ns."""

    status: list[int]
    scheduled_ns: list[int]
    sent_ns: list[int]
    done_ns: list[int]
    start_ns: int
    reconnects: int = 0
    client_cpu_s: float = 0.0

    @property
    def completed(self) -> list[int]:
        return [i for i, status in enumerate(self.status) if status]

    def ok_count(self) -> int:
        return sum(1 for status in self.status if 200 <= status < 300)

    def rate(self) -> float:
        done = self.completed
        if not done:
            return 0.0
        elapsed = max(self.done_ns[i] for i in done) - self.start_ns
        return len(done) / (elapsed / 1e9) if elapsed > 0 else 0.0

    def latencies_ms(self, *, from_schedule: bool) -> list[float]:
        origin = self.scheduled_ns if from_schedule else self.sent_ns
        return sorted((self.done_ns[i] - origin[i]) / 1e6 for i in self.completed)


@dataclass(frozen=True)
class Plan:
    """When and where the client threads send: request ``i`` is due ``i * interval_ns`` after
    ``start_ns``, whichever thread carries it; ``interval_ns`` 0 means closed loop."""

    port: int
    start_ns: int
    interval_ns: int
    deadline_ns: int


def _client_thread(
    plan: Plan,
    work: list[tuple[int, bytes]],
    out: dict[int, tuple[int, int, int, int]],
    reconnects: list[int],
) -> None:
    connection = Connection(plan.port)
    try:
        for index, request in work:
            scheduled = plan.start_ns + index * plan.interval_ns
            now = time.perf_counter_ns()
            if now > plan.deadline_ns:
                break
            if scheduled > now:
                time.sleep((scheduled - now) / 1e9)
            sent = time.perf_counter_ns()
            try:
                status = connection.roundtrip(request)
            except OSError:
                status = -1
            out[index] = (status, scheduled if plan.interval_ns else sent, sent, time.perf_counter_ns())
    finally:
        reconnects.append(connection.reconnects)
        connection.close()


def _client_process(plan: Plan, work: list[list[tuple[int, bytes]]], pipe: Any) -> None:
    out: dict[int, tuple[int, int, int, int]] = {}
    reconnects: list[int] = []
    threads = [threading.Thread(target=_client_thread, args=(plan, part, out, reconnects)) for part in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    indexes = array.array("q", out.keys())
    columns = [array.array("q", (row[k] for row in out.values())) for k in range(4)]
    header = [sum(reconnects), time.process_time(), indexes.tobytes().hex()]
    pipe.send_bytes(json.dumps(header).encode())
    for column in columns:
        pipe.send_bytes(column.tobytes())
    pipe.close()


class Load:
    """Requests spread over client processes x threads, each thread on its own connection.

    ``rate`` None: closed loop, each thread sends its next request when the last is answered.
    ``rate`` set: the requests are due evenly spaced, ``1/rate`` apart, and thread ``k`` of
    ``n`` carries requests ``k``, ``k + n``, ...: the threads' schedules interleave, so the
    server sees the offered rate, not bursts of one request per connection at a time.
    """

    def __init__(
        self,
        port: int,
        requests: Sequence[bytes],
        *,
        processes: int,
        threads: int,
        rate: float | None,
        max_seconds: float,
    ) -> None:
        lanes = processes * threads
        self.count = len(requests)
        parts: list[list[tuple[int, bytes]]] = [[] for _ in range(lanes)]
        for index, request in enumerate(requests):
            parts[index % lanes].append((index, request))
        self.interval_ns = int(1e9 / rate) if rate else 0
        # Time for the processes to start and connect before the first request.
        self.start_ns = time.perf_counter_ns() + 400_000_000
        deadline = self.start_ns + int(max_seconds * 1e9)
        context = multiprocessing.get_context("fork")
        self.procs = []
        self.pipes = []
        for p in range(processes):
            receiver, sender = context.Pipe(duplex=False)
            work = parts[p * threads : (p + 1) * threads]
            plan = Plan(port, self.start_ns, self.interval_ns, deadline)
            proc = context.Process(target=_client_process, args=(plan, work, sender))
            proc.start()
            sender.close()
            self.procs.append(proc)
            self.pipes.append(receiver)

    def scheduled_ns(self, index: int) -> int:
        return self.start_ns + index * self.interval_ns

    def wait(self) -> LoadResult:
        size = self.count
        result = LoadResult([0] * size, [0] * size, [0] * size, [0] * size, self.start_ns)
        try:
            for pipe in self.pipes:
                reconnects, cpu_s, hex_indexes = json.loads(pipe.recv_bytes())
                result.client_cpu_s += cpu_s
                indexes = array.array("q", bytes.fromhex(hex_indexes))
                columns = []
                for _ in range(4):
                    column = array.array("q")
                    column.frombytes(pipe.recv_bytes())
                    columns.append(column)
                result.reconnects += reconnects
                for row, index in enumerate(indexes):
                    result.status[index] = columns[0][row]
                    result.scheduled_ns[index] = columns[1][row]
                    result.sent_ns[index] = columns[2][row]
                    result.done_ns[index] = columns[3][row]
        finally:
            for proc in self.procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        return result
