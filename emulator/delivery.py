"""The Svix side: sign each event and deliver it to every endpoint, retrying on Svix's schedule.

A message gets one ``svix-id`` for its whole life (all attempts, all endpoints, chaos
duplicates included) and is signed afresh at every attempt, as Svix does. Background worker
threads take due attempts from one time-ordered queue, so a failed message is retried after
newer ones have gone through: there is no ordering guarantee, as with the real thing.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from svix.webhooks import Webhook

from emulator import payloads
from emulator.chaos import Chaos, ChaosConfig
from emulator.records import IdGenerator, Json, wall_ms

# Delay before each attempt, in seconds: immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
RETRY_SCHEDULE: tuple[float, ...] = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
USER_AGENT = "Svix-Webhooks/1.0 (orgsync-emulator)"


@dataclass(frozen=True)
class Message:
    seq: int
    msg_id: str
    event_type: str
    timestamp: int
    body: str

    @property
    def data(self) -> Json:
        value = json.loads(self.body)["data"]
        assert isinstance(value, dict)
        return value


@dataclass(frozen=True)
class Attempt:
    """One line of the delivery log: ``attempt`` counts from 1 (0: dropped), ``copy`` 1 is a duplicate."""

    seq: int
    msg_id: str
    event_type: str
    endpoint: str
    attempt: int
    copy: int
    sent_at: int
    status: int | None
    error: str | None
    duration_ms: float
    outcome: str  # "succeeded", "retrying", "failed" (schedule exhausted) or "dropped"

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "msg_id": self.msg_id,
            "type": self.event_type,
            "endpoint": self.endpoint,
            "attempt": self.attempt,
            "copy": self.copy,
            "sent_at": self.sent_at,
            "status": self.status,
            "error": self.error,
            "duration_ms": round(self.duration_ms, 3),
            "outcome": self.outcome,
        }


@dataclass(frozen=True)
class _Task:
    message: Message
    endpoint: int
    attempt: int
    copy: int


class _Endpoint:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook URL must be http(s)://host[:port]/path, not {url!r}")
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class WebhookDelivery:
    """Background delivery of signed events to endpoints, with retries, chaos and a log."""

    def __init__(
        self,
        urls: Sequence[str],
        signing_secret: str,
        *,
        instance_id: str = "ins_emulator",
        chaos: ChaosConfig | None = None,
        time_scale: float = 1.0,
        workers: int = 4,
        timeout: float = 15.0,
        schedule: Sequence[float] = RETRY_SCHEDULE,
        log_limit: int = 200_000,
    ) -> None:
        if time_scale < 0:
            raise ValueError("time_scale must not be negative")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if not schedule:
            raise ValueError("the retry schedule needs at least one attempt")
        self._endpoints = [_Endpoint(u) for u in urls]
        self._signer = Webhook(signing_secret)
        self.instance_id = instance_id
        self.chaos = Chaos(chaos or ChaosConfig())
        self.time_scale = time_scale
        self.timeout = timeout
        self.schedule = tuple(schedule)
        # Message ids are never seeded: Svix's are unique, and a receiver deduplicates on them,
        # so a restarted emulator must not reuse them. Chaos plans are keyed by sequence number.
        self._ids = IdGenerator()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, _Task]] = []
        self._order = itertools.count()
        self._seq = itertools.count(1)
        self._inflight = 0
        self._closed = False
        self._started_at = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._workers = workers * max(1, len(self._endpoints))
        self._log: deque[Attempt] = deque(maxlen=log_limit)
        self._dropped: list[tuple[Message, str]] = []
        self._outcomes: dict[tuple[str, int], str] = {}
        self._messages = 0
        self._local = threading.local()

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self._endpoints]

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._started_at = time.monotonic()
            for n in range(self._workers):
                thread = threading.Thread(target=self._run, name=f"emulator-delivery-{n}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._work.notify_all()
            self._idle.notify_all()
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=self.timeout + 1)

    # ---------------------------------------------------------------- intake
    def on_event(self, event_type: str, data: Json, timestamp: int) -> None:
        """An ``EventSink`` for ``State.subscribe``: wrap in Clerk's envelope and enqueue."""
        body = json.dumps(
            payloads.envelope(event_type, data, timestamp=timestamp, instance_id=self.instance_id),
            separators=(",", ":"),
        )
        self.enqueue(event_type, body, timestamp)

    def enqueue(self, event_type: str, body: str, timestamp: int) -> Message:
        with self._lock:
            message = Message(next(self._seq), self._ids.new("msg"), event_type, timestamp, body)
            self._messages += 1
            now = time.monotonic()
            for index, endpoint in enumerate(self._endpoints):
                plan = self.chaos.plan(message.seq, index)
                if plan.drop:
                    self._dropped.append((message, endpoint.url))
                    self._outcomes[(message.msg_id, index)] = "dropped"
                    self._log.append(
                        Attempt(
                            message.seq, message.msg_id, event_type, endpoint.url, 0, 0, wall_ms(), None,
                            "dropped by chaos", 0.0, "dropped",
                        )
                    )  # fmt: skip
                    continue
                self._outcomes[(message.msg_id, index)] = "pending"
                self._push(now + plan.first_delay, _Task(message, index, 1, 0))
                if plan.duplicate_delay is not None:
                    self._push(now + plan.duplicate_delay, _Task(message, index, 1, 1))
            return message

    def _push(self, due: float, task: _Task) -> None:
        heapq.heappush(self._heap, (due, next(self._order), task))
        self._work.notify()

    # -------------------------------------------------------------- queries
    def settle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or in flight (delivered, failed or dropped). False on timeout."""
        with self._lock:
            return self._idle.wait_for(
                lambda: self._closed or (not self._heap and not self._inflight), timeout
            )

    def pending(self) -> int:
        with self._lock:
            return len(self._heap) + self._inflight

    def log(self) -> list[Attempt]:
        with self._lock:
            return list(self._log)

    def dropped(self) -> list[Message]:
        """Messages that chaos dropped for at least one endpoint (a missed event: never retried)."""
        with self._lock:
            seen: dict[str, Message] = {}
            for message, _ in self._dropped:
                seen.setdefault(message.msg_id, message)
            return list(seen.values())

    def outcomes(self) -> dict[str, dict[str, str]]:
        """Final state per message id and endpoint URL: pending, succeeded, failed or dropped."""
        with self._lock:
            result: dict[str, dict[str, str]] = {}
            for (msg_id, index), outcome in self._outcomes.items():
                result.setdefault(msg_id, {})[self._endpoints[index].url] = outcome
            return result

    def stats(self) -> dict[str, int]:
        with self._lock:
            values = list(self._outcomes.values())
            return {
                "messages": self._messages,
                "pending": len(self._heap) + self._inflight,
                "succeeded": values.count("succeeded"),
                "failed": values.count("failed"),
                "dropped": values.count("dropped"),
                "attempts": sum(1 for a in self._log if a.attempt > 0),
            }

    # --------------------------------------------------------------- workers
    def _run(self) -> None:
        try:
            self._deliver_until_closed()
        finally:
            # Kept-alive connections belong to this thread: close them as it ends, or their
            # sockets are left for the garbage collector (a ResourceWarning per endpoint).
            for index in list(self._local.__dict__.get("connections", {})):
                self._forget(index)

    def _deliver_until_closed(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        task = heapq.heappop(self._heap)[2]
                        self._inflight += 1
                        break
                    self._work.wait(self._heap[0][0] - now if self._heap else None)
            try:
                self._attempt(task)
            finally:
                with self._lock:
                    self._inflight -= 1
                    if not self._heap and not self._inflight:
                        self._idle.notify_all()

    def _attempt(self, task: _Task) -> None:
        message, endpoint = task.message, self._endpoints[task.endpoint]
        sent_at = wall_ms()
        started = time.monotonic()
        if self.chaos.in_outage(started - self._started_at):
            status: int | None = None
            error: str | None = "endpoint outage (chaos)"
        else:
            status, error = self._post(task.endpoint, message)
        duration = (time.monotonic() - started) * 1000
        succeeded = status is not None and 200 <= status < 300
        with self._lock:
            if succeeded:
                outcome = "succeeded"
            elif task.attempt < len(self.schedule) and not self._closed:
                outcome = "retrying"
                delay = self.schedule[task.attempt] * self.time_scale
                self._push(
                    time.monotonic() + delay, _Task(message, task.endpoint, task.attempt + 1, task.copy)
                )
            else:
                outcome = "failed"
            key = (message.msg_id, task.endpoint)
            # A success by either copy wins; only the original copy running out of attempts fails it.
            if self._outcomes.get(key) != "succeeded" and (
                outcome == "succeeded" or (outcome == "failed" and task.copy == 0)
            ):
                self._outcomes[key] = outcome
            self._log.append(
                Attempt(
                    message.seq, message.msg_id, message.event_type, endpoint.url, task.attempt, task.copy,
                    sent_at, status, error, duration, outcome,
                )
            )  # fmt: skip

    def _connection(self, index: int) -> http.client.HTTPConnection:
        cache: dict[int, http.client.HTTPConnection] = self._local.__dict__.setdefault("connections", {})
        conn = cache.get(index)
        if conn is None:
            endpoint = self._endpoints[index]
            factory = http.client.HTTPSConnection if endpoint.https else http.client.HTTPConnection
            conn = factory(endpoint.host, endpoint.port, timeout=self.timeout)
            cache[index] = conn
        return conn

    def _forget(self, index: int) -> None:
        cache: dict[int, http.client.HTTPConnection] = self._local.__dict__.setdefault("connections", {})
        conn = cache.pop(index, None)
        if conn is not None:
            conn.close()

    def _post(self, index: int, message: Message) -> tuple[int | None, str | None]:
        when = datetime.now(tz=UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "svix-id": message.msg_id,
            "svix-timestamp": str(int(when.timestamp())),
            "svix-signature": self._signer.sign(message.msg_id, when, message.body),
        }
        body = message.body.encode()
        path = self._endpoints[index].path
        # A kept-alive connection may have been closed by the server meanwhile: retry that
        # case once on a fresh connection before calling it a failed attempt.
        for reused in (True, False):
            conn = self._connection(index)
            fresh = conn.sock is None
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                if response.will_close:
                    self._forget(index)
                return response.status, None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self._forget(index)
                if reused and not fresh:
                    continue
                return None, f"{type(exc).__name__}: {exc}"
            except (OSError, http.client.HTTPException) as exc:
                self._forget(index)
                return None, f"{type(exc).__name__}: {exc}"
        return None, "connection closed"
