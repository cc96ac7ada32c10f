"""Flow control: a cluster-wide request rate and spend cap, and a retry budget.

The cluster-wide limiter is a token bucket in one Ray actor. Clients take tokens in blocks
(about a quarter second's worth) and pace requests locally, so the actor sees a few calls
per second rather than one per request. The same actor enforces the hard cap on requests
sent by the whole run.
"""
from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Plain token bucket with a total cap; used directly or inside the Ray actor."""

    def __init__(self, qps: float = 0.0, max_requests: int = 0, burst_s: float = 0.25):
        self.qps, self.max_requests = qps, max_requests
        self.capacity = max(1.0, qps * burst_s) if qps > 0 else float("inf")
        self.tokens = self.capacity if qps > 0 else float("inf")
        self.last = time.monotonic()
        self.granted = 0

    def acquire(self, want: int) -> tuple[int, float, bool]:
        """(tokens granted, seconds to wait before asking again, cap reached)."""
        if self.max_requests and self.granted >= self.max_requests:
            return 0, 0.0, True
        if self.max_requests:
            want = min(want, self.max_requests - self.granted)
        if self.qps <= 0:
            self.granted += want
            return want, 0.0, False
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.qps)
        self.last = now
        grant = int(min(want, self.tokens))
        self.tokens -= grant
        self.granted += grant
        wait = 0.0 if grant else (1.0 - self.tokens) / self.qps
        return grant, wait, False

    def stats(self) -> dict:
        return {"granted": self.granted}


def bucket_actor(name: str, qps: float, max_requests: int):
    """The named limiter actor (created once, shared by every LALM actor), pinned to the driver's
    node: it holds the spend already counted, so it must not die with a worker node (a restarted
    one would start counting from zero), and the driver's node failing ends the job anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor_cls = ray.remote(num_cpus=0, max_concurrency=64)(TokenBucket)
    return actor_cls.options(name=name, get_if_exists=True, lifetime=None, scheduling_strategy=here).remote(
        qps, max_requests)


class SpendCapReached(Exception):
    pass


class RateLimiter:
    """Client side: take tokens in blocks from a local bucket or the cluster actor; pace locally."""

    def __init__(self, qps: float = 0.0, max_requests: int = 0, actor=None, block_s: float = 0.25):
        self.actor = actor
        self.local = None if actor is not None else TokenBucket(qps, max_requests)
        self.block = max(1, int(qps * block_s)) if qps > 0 else 64
        self.qps = qps
        self.tokens = 0
        self._lock = asyncio.Lock()
        self._next_time = 0.0

    async def _refill(self) -> None:
        while True:
            if self.actor is not None:
                grant, wait, capped = await self.actor.acquire.remote(self.block)
            else:
                grant, wait, capped = self.local.acquire(self.block)
            if capped:
                raise SpendCapReached("the run reached lalm.max_requests; no further requests are sent")
            if grant:
                self.tokens += grant
                return
            await asyncio.sleep(max(wait, 0.005))

    async def acquire(self) -> None:
        async with self._lock:
            if self.tokens <= 0:
                await self._refill()
            self.tokens -= 1
            if self.qps > 0:  # spread the block's requests evenly instead of bursting
                now = time.monotonic()
                if self._next_time > now:
                    await asyncio.sleep(self._next_time - now)
                self._next_time = max(now, self._next_time) + 1.0 / self.qps


class RetryBudget:
    """Retries allowed as a fraction of the requests needed so far (per actor, so the sum holds)."""

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.needed = 0
        self.retries = 0

    def add_needed(self, n: int) -> None:
        self.needed += n

    def try_spend(self) -> bool:
        if self.retries + 1 > self.fraction * self.needed:
            return False
        self.retries += 1
        return True
