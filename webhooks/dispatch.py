"""Hands committed inbox ids to the broker from a background thread, coalesced into batches."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable

from models.redact import redact

logger = logging.getLogger(__name__)

Send = Callable[[list[int]], None]


_WARN_EVERY = 10.0
# Each send becomes one worker task, and a task costs a transaction and a few round trips
# whatever its size: fewer, larger tasks keep the worker ahead of the load. 100 ms adds at
# most that to the freshness of the mirror.
DEFAULT_INTERVAL = 0.1
# Bound on ids waiting for a send that hangs: beyond it new ids are left to the sweeper.
MAX_PENDING = 100_000


class Dispatcher:
    """Coalesces submitted ids and calls ``send`` at most once per ``interval``, in chunks.

    The request path only appends to a list; the broker round trip happens on this thread,
    so a slow or dead broker never delays an acknowledgement. A failed send is logged and
    dropped: the rows stay pending in the inbox and the periodic sweeper enqueues them.

    The thread starts on the first ``submit`` in the process that serves requests, and the
    state is reset in a forked child, so an instance built before a fork works in the child.
    """

    def __init__(self, send: Send, *, max_batch: int = 500, interval: float = DEFAULT_INTERVAL) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if interval < 0:
            raise ValueError("interval must not be negative")
        self._send = send
        self._max_batch = max_batch
        self._interval = interval
        self._init_state()
        reference = weakref.ref(self)

        def _after_fork() -> None:
            dispatcher = reference()
            if dispatcher is not None:
                dispatcher._init_state()

        os.register_at_fork(after_in_child=_after_fork)

    def _init_state(self) -> None:
        # Also run in a forked child: the parent's thread does not exist there, and its lock
        # may have been held at the moment of the fork.
        self._cond = threading.Condition()
        self._pending: list[int] = []
        self._submitted = 0  # ids accepted by submit(), ever
        self._done = 0  # ids sent or dropped, ever
        self._urgent = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._last_send = float("-inf")
        self._failing_since: float | None = None
        self._last_warning = float("-inf")
        self._dropped = 0

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def submit(self, ids: Iterable[int]) -> None:
        """Queue ids for sending; returns at once. Ignored (with a debug log) after ``close``."""
        batch = list(ids)
        if not batch:
            return
        with self._cond:
            if self._closed:
                logger.debug("dispatcher closed: %d ids left to the sweeper", len(batch))
                return
            room = MAX_PENDING - len(self._pending)
            if room < len(batch):
                logger.debug("dispatcher backlog full: %d ids left to the sweeper", len(batch) - max(room, 0))
                batch = batch[: max(room, 0)]
                if not batch:
                    return
            was_empty = not self._pending
            self._pending.extend(batch)
            self._submitted += len(batch)
            if self._thread is None:
                self._start()
            elif was_empty:
                # Only the wait for a first id needs waking: ids joining a batch that is
                # already pacing change nothing it waits for (a wake-up per request would).
                self._cond.notify_all()

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Send everything submitted so far without waiting for the interval; True when done."""
        with self._cond:
            target = self._submitted
            if self._done >= target:
                return True
            self._urgent = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target, timeout=timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush, stop the thread and refuse further submits. Safe to call twice."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._urgent = True
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("dispatcher did not finish within %.1f s; the sweeper will catch up", timeout)
        atexit.unregister(self.close)

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="orgsync-dispatcher", daemon=True)
        self._thread = thread
        atexit.register(self.close)
        thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self._closed)
                if not self._pending:
                    return  # closed and drained
                # Pace the sends: ids arriving meanwhile join this batch.
                delay = self._last_send + self._interval - time.monotonic()
                if delay > 0:
                    self._cond.wait_for(lambda: self._urgent or self._closed, timeout=delay)
                batch = list(dict.fromkeys(self._pending))
                count = len(self._pending)
                self._pending = []
                self._urgent = False
            try:
                self._send_chunks(batch)
            except Exception:  # never let a bug here stop the thread for the process's lifetime
                logger.exception("dispatcher failed to hand %d ids to the broker", len(batch))
            self._last_send = time.monotonic()
            with self._cond:
                self._done += count
                self._cond.notify_all()

    def _send_chunks(self, batch: list[int]) -> None:
        for start in range(0, len(batch), self._max_batch):
            chunk = batch[start : start + self._max_batch]
            try:
                self._send(chunk)
            except Exception as exc:
                self._note_failure(exc, len(chunk))
            else:
                self._note_success()

    def _note_failure(self, exc: Exception, count: int) -> None:
        now = time.monotonic()
        self._dropped += count
        if self._failing_since is None:
            self._failing_since = now
        # One warning per outage window, not one per batch: at full intake that is 50 a second.
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            logger.warning(
                "broker unavailable, %d ids left pending for the sweeper so far: %s: %s",
                self._dropped,
                type(exc).__name__,
                redact(str(exc)),
            )

    def _note_success(self) -> None:
        if self._failing_since is not None:
            logger.info(
                "broker reachable again after %.1f s; %d ids were left to the sweeper",
                time.monotonic() - self._failing_since,
                self._dropped,
            )
            self._failing_since = None
            self._dropped = 0
            self._last_warning = float("-inf")
