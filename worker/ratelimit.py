"""Clerk's request budgets, shared by every worker process through the ``limits`` library's storage.

Two moving windows: the instance budget (every Backend API call) and role changes per
membership. A moving window, unlike a fixed one, never lets two bursts meet at a window
boundary, so no span of ``window`` seconds ever holds more than the budget, whatever
windows Clerk counts in. After a 429, ``pause_until`` makes every process wait out
``Retry-After``: one process hitting the limit is evidence that all of them would.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from limits import RateLimitItemPerSecond
from limits.storage import RedisStorage, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from models import metrics
from models.errors import RetryableError

log = logging.getLogger(__name__)

WINDOW_S = 10
PAUSE_KEY = "clerk:pause_until"
# Polling interval bounds while waiting for a slot: short enough to use a freed slot soon,
# jittered so that processes woken together do not all retry at the same instant.
MIN_SLEEP_S = 0.02
MAX_SLEEP_S = 1.0


class RateLimitTimeoutError(RetryableError):
    """No slot within the caller's timeout: the call was not made, try again later."""

    def __init__(self, message: str, *, wait_s: float) -> None:
        super().__init__(message)
        self.wait_s = wait_s


class RateLimiter:
    """The instance budget and the per-membership budget, in ``storage_url`` (redis:// or memory://).

    ``share`` caps this consumer at that fraction of the instance budget, counted under its
    ``consumer`` name, while it still draws from the one shared budget: a background scan run
    with ``share=0.5`` can never take the whole budget from commands.
    """

    def __init__(
        self,
        storage_url: str,
        instance_per_window: int,
        membership_per_window: int,
        *,
        share: float = 1.0,
        consumer: str = "commands",
        window: int = WINDOW_S,
        namespace: str = "orgsync",
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if instance_per_window < 1 or membership_per_window < 1:
            raise ValueError("rate limits must be at least 1 per window")
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        if window < 1:
            raise ValueError("window must be at least one second")
        storage = storage_from_string(storage_url)
        if not isinstance(storage, Storage):
            raise ValueError("the rate limit storage must be a synchronous one (redis:// or memory://)")
        self._storage = storage
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._namespace = namespace
        self._instance = RateLimitItemPerSecond(instance_per_window, window, namespace=namespace)
        self._membership = RateLimitItemPerSecond(membership_per_window, window, namespace=namespace)
        capped = max(1, math.floor(instance_per_window * share))
        self._cap = (
            RateLimitItemPerSecond(capped, window, namespace=namespace)
            if capped < instance_per_window
            else None
        )
        self._consumer = consumer
        self._clock = clock
        self._sleep = sleep
        self._local_pause = 0.0
        self._pause_lock = threading.Lock()
        self.window = window

    @classmethod
    def from_settings(
        cls, storage_url: str, rate_limit: int, membership_rate_limit: int, *, share: float = 1.0
    ) -> RateLimiter:
        return cls(storage_url, rate_limit, membership_rate_limit, share=share)

    # ------------------------------------------------------------------ pause
    def _redis(self) -> Any:
        if isinstance(self._storage, RedisStorage):
            return self._storage.get_connection()
        return None

    def _pause_key(self) -> str:
        return f"{self._namespace}:{PAUSE_KEY}"

    def pause_until(self, until: float) -> None:
        """Every process sharing the storage waits until ``until`` (epoch seconds) before calling."""
        client = self._redis()
        if client is None:
            with self._pause_lock:
                self._local_pause = max(self._local_pause, until)
            return
        current = self.paused_until()
        if until <= current:
            return
        ttl_ms = max(1, math.ceil((until - self._clock()) * 1000))
        # Two processes may both write after a 429 at the same moment; their Retry-After values
        # are about equal, so the lost update costs nothing worth a Lua script.
        client.set(self._pause_key(), repr(until), px=ttl_ms)

    def paused_until(self) -> float:
        client = self._redis()
        if client is None:
            with self._pause_lock:
                return self._local_pause
        raw = client.get(self._pause_key())
        if raw is None:
            return 0.0
        try:
            return float(raw)
        except ValueError:
            return 0.0

    # ---------------------------------------------------------------- acquire
    def _wait_for(self, item: RateLimitItemPerSecond, *identifiers: str) -> float:
        stats = self._limiter.get_window_stats(item, *identifiers)
        return max(MIN_SLEEP_S, stats.reset_time - self._clock())

    def acquire(self, membership_key: str | None = None, *, timeout: float = 60.0) -> float:
        """Block until one call may be made (a role change on ``membership_key`` if given).

        Returns the seconds waited; raises ``RateLimitTimeoutError`` (retryable) after ``timeout``.
        """
        started = self._clock()
        deadline = started + timeout
        while True:
            now = self._clock()
            wait = 0.0
            paused = self.paused_until()
            if paused > now:
                wait = paused - now
            elif membership_key is not None and not self._limiter.test(self._membership, membership_key):
                wait = self._wait_for(self._membership, membership_key)
            elif self._cap is not None and not self._limiter.hit(self._cap, "consumer", self._consumer):
                wait = self._wait_for(self._cap, "consumer", self._consumer)
            elif not self._limiter.hit(self._instance, "instance"):
                wait = self._wait_for(self._instance, "instance")
            elif membership_key is not None and not self._limiter.hit(self._membership, membership_key):
                # Another process took the membership's last slot between test and hit; the
                # instance slot just taken is lost, which only errs on the side of fewer calls.
                wait = self._wait_for(self._membership, membership_key)
            else:
                metrics.rate_limit_wait(now - started)
                return now - started
            if now + wait > deadline:
                metrics.rate_limit_wait(now - started)
                raise RateLimitTimeoutError(
                    f"Clerk rate limit: no slot within {timeout:g} s", wait_s=max(wait, MIN_SLEEP_S)
                )
            self._sleep(min(MAX_SLEEP_S, wait) * random.uniform(1.0, 1.2))

    def reset(self) -> None:
        """Forget the instance window, this consumer's cap and any pause (not membership windows)."""
        self._limiter.clear(self._instance, "instance")
        if self._cap is not None:
            self._limiter.clear(self._cap, "consumer", self._consumer)
        with self._pause_lock:
            self._local_pause = 0.0
        client = self._redis()
        if client is not None:
            client.delete(self._pause_key())
