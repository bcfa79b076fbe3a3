"""Rate limits: what a refusal says, and the per-key token buckets for denoising.

The mail limits are counted in the database (``store.mail_requests_since``), so they hold
across processes and replicas; the denoising buckets live in each process's memory, since a
database write per request would cost more than the limit protects.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable


class RateLimited(Exception):
    """A request over a limit; ``retry_after_s`` says when one would pass."""

    def __init__(self, message: str, retry_after_s: float, limit: str) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        self.limit = limit


class TokenBuckets:
    """One bucket per key: ``burst`` requests at once, refilled at ``rate_per_s``.

    Memory is bounded: past ``max_keys`` buckets, the full ones (keys idle long enough to have
    refilled) are dropped, which changes nothing for those keys.
    """

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key → (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: Hashable) -> float:
        """0 if the request may pass (a token is spent), else the seconds until one would."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                if len(self._buckets) > self._max_keys:
                    self._drop_full(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self._rate

    def _drop_full(self, now: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self._rate >= self._burst]
        for key in full:
            del self._buckets[key]
