"""The shared rate limiter: instance and per-membership budgets, shares, and pauses after a 429."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from worker.ratelimit import RateLimiter, RateLimitTimeoutError


def limiter(storage: str, instance: int, membership: int = 10, **options: object) -> RateLimiter:
    options.setdefault("namespace", f"t{uuid.uuid4().hex[:10]}")
    return RateLimiter(storage, instance, membership, **options)  # type: ignore[arg-type]


def grants(rl: RateLimiter, tries: int, membership_key: str | None = None) -> int:
    """How many of ``tries`` immediate acquisitions succeed."""
    granted = 0
    for _ in range(tries):
        try:
            rl.acquire(membership_key, timeout=0)
        except RateLimitTimeoutError:
            continue
        granted += 1
    return granted


def test_instance_budget_is_enforced_in_memory() -> None:
    rl = limiter("memory://", 3, window=60)
    assert grants(rl, 10) == 3
    with pytest.raises(RateLimitTimeoutError) as info:
        rl.acquire(timeout=0)
    assert info.value.wait_s > 0


def test_membership_budget_is_per_membership() -> None:
    rl = limiter("memory://", 100, 2, window=60)
    assert grants(rl, 5, "org_a/user_1") == 2
    assert grants(rl, 5, "org_a/user_2") == 2
    # Plain calls still have instance budget left.
    assert grants(rl, 3) == 3


def test_acquire_blocks_until_a_slot_frees() -> None:
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    rl = limiter("memory://", 1, window=1, sleep=sleep)
    rl.acquire(timeout=5)
    assert not slept
    waited = rl.acquire(timeout=5)
    assert waited > 0 and slept


def test_validation() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RateLimiter("memory://", 0, 10)
    with pytest.raises(ValueError, match="share"):
        RateLimiter("memory://", 10, 10, share=1.5)


@pytest.mark.redis
def test_budget_is_shared_across_limiters_through_redis(redis_url: str) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    first = limiter(redis_url, 5, window=60, namespace=namespace)
    second = limiter(redis_url, 5, window=60, namespace=namespace)
    assert grants(first, 3) + grants(second, 10) == 5
    assert grants(first, 1) == 0


@pytest.mark.redis
def test_concurrent_processes_never_exceed_the_budget(redis_url: str) -> None:
    """Eight limiters (one per simulated process) racing for a budget of 7: exactly 7 win."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    limiters = [limiter(redis_url, 7, window=60, namespace=namespace) for _ in range(8)]
    results: list[int] = []
    barrier = threading.Barrier(len(limiters))

    def run(rl: RateLimiter) -> None:
        barrier.wait()
        results.append(grants(rl, 4))

    threads = [threading.Thread(target=run, args=(rl,)) for rl in limiters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == 7


@pytest.mark.redis
def test_share_caps_a_consumer_but_not_the_others(redis_url: str) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    background = limiter(redis_url, 10, window=60, namespace=namespace, share=0.5, consumer="reconcile")
    commands = limiter(redis_url, 10, window=60, namespace=namespace)
    assert grants(background, 10) == 5
    assert grants(commands, 10) == 5


@pytest.mark.redis
def test_a_pause_after_429_holds_every_process(redis_url: str) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    first = limiter(redis_url, 100, window=60, namespace=namespace)
    second = limiter(redis_url, 100, window=60, namespace=namespace)
    until = time.time() + 30
    first.pause_until(until)
    assert second.paused_until() == pytest.approx(until)
    with pytest.raises(RateLimitTimeoutError):
        second.acquire(timeout=0)
    # An earlier deadline never shortens a longer pause.
    second.pause_until(until - 20)
    assert first.paused_until() == pytest.approx(until)
    first.reset()
    assert second.paused_until() == 0.0
    assert grants(second, 1) == 1


def test_a_pause_in_memory_holds_this_process() -> None:
    rl = limiter("memory://", 100, window=60)
    rl.pause_until(time.time() + 30)
    with pytest.raises(RateLimitTimeoutError):
        rl.acquire(timeout=0)
