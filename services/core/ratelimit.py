"""Token buckets: per credential on the API, per connection on the socket pods."""

from __future__ import annotations

import time
from collections import OrderedDict


class TokenBucket:
    """`rate_per_s` tokens a second, up to `burst`; `take` spends them or says how long to wait."""

    __slots__ = ("_at", "_tokens", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: int, now: float | None = None) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic() if now is None else now

    def take(self, cost: float = 1.0, now: float | None = None) -> float:
        """0.0 when allowed (and spent), else the seconds until `cost` tokens are there."""
        now = time.monotonic() if now is None else now
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens >= cost:
            self._tokens -= cost
            return 0.0
        return (cost - self._tokens) / self.rate_per_s

    @property
    def full(self) -> bool:
        return self._tokens >= self.burst


class KeyedLimiter:
    """One bucket per key, the least recently used forgotten beyond `max_keys` (bounded memory)."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, cost: float = 1.0) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate_per_s, self.burst)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(cost)
