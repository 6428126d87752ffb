"""Per-connection guards shared by native websocket and socket.io sessions."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable

from services.core.auth import Claims
from services.core.ratelimit import TokenBucket

FLOOD_FORGIVEN_AFTER_S = 1.0  # a second without a dropped frame ends a flood


class Flood(enum.Enum):
    OK = "ok"  # within the budget: handle the frame
    FIRST = "first"  # the first frame over the budget: drop it and tell the client once
    DROP = "drop"  # over the budget again: drop it
    CLOSE = "close"  # still flooding after the warning: close with 1013


class FloodGuard:
    """Client frames per second: a token bucket, and how long a flood has gone on."""

    __slots__ = ("_bucket", "_burst", "_dropped", "_last_drop_at")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self._bucket = TokenBucket(rate_per_s, burst)
        self._burst = burst
        self._dropped = 0
        self._last_drop_at = 0.0

    def check(self) -> Flood:
        now = time.monotonic()
        if self._bucket.take(1.0, now) == 0.0:
            if self._dropped and now - self._last_drop_at > FLOOD_FORGIVEN_AFTER_S:
                self._dropped = 0
            return Flood.OK
        self._dropped += 1
        self._last_drop_at = now
        if self._dropped == 1:
            return Flood.FIRST
        return Flood.CLOSE if self._dropped > self._burst else Flood.DROP


class TokenExpiry:
    """Calls `on_expired` at the token's `exp`, not at the next message; moved on refresh."""

    __slots__ = ("_handle", "_on_expired")

    def __init__(self, on_expired: Callable[[], None]) -> None:
        self._on_expired = on_expired
        self._handle: asyncio.TimerHandle | None = None

    def schedule(self, claims: Claims | None) -> None:
        self.cancel()
        if claims is not None:
            delay_s = max(0.0, claims.exp - time.time())
            self._handle = asyncio.get_running_loop().call_later(delay_s, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._on_expired()


class SendBudget:
    """SEND_BUFFER_MAX_BYTES of unsent data per connection; over it the connection is closed 1013.

    `admits` runs at each live delivery (only when something is still unsent: the fast path
    never calls it). A replay, bounded by what the client asked for, raises the allowance to
    what is unsent right after it, until that drains. `stalled` runs once a maintenance tick,
    so a client that stops reading after a burst is closed without waiting for the next message.
    """

    __slots__ = ("_allowance", "_budget", "_over")

    def __init__(self, max_bytes: int) -> None:
        self._budget = self._allowance = max_bytes
        self._over = False

    def admits(self, unsent: int) -> bool:
        if unsent > self._allowance:
            return False
        if unsent <= self._budget:
            self._allowance = self._budget  # a replay's extra allowance ends once drained
        return True

    def replayed(self, unsent: int) -> None:
        self._allowance = max(self._allowance, unsent)

    def drained(self) -> None:
        self._allowance = self._budget

    def stalled(self, unsent: int) -> bool:
        """Over the allowance at this tick and the one before (a burst that drains within a
        tick is fine; a client that stopped reading is not)."""
        over = unsent > self._allowance
        was, self._over = self._over, over
        return over and was
