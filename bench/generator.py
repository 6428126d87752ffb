"""The one message generator every server under test is driven by.

It emits messages at a fixed rate on the event loop of the process it runs in. Each message
carries its sequence number and its *scheduled* send time (wall clock): when the process falls
behind, the lateness shows up in the clients' latency instead of quietly lowering the rate
(no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

# A short chat line: messages of a realistic size (a frame is about 150 bytes).
TEXT = "the quick brown fox jumps over the lazy dog"
BURST_RATE = 5000.0  # msg/s of a "burst": as fast as a loop comfortably goes, still paced


def message_data(seq: int, scheduled_s: float) -> dict[str, Any]:
    """The `data` of every bench message: what clients check (seq) and time (t)."""
    return {"seq": seq, "t": scheduled_s, "text": TEXT}


Emit = Callable[[int, float], Awaitable[None]]


class PacedGenerator:
    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self.next_seq = 0

    async def run(self, rate: float, duration_s: float) -> dict[str, Any]:
        """Emits `rate * duration_s` messages; returns what was sent and how late it ran."""
        loop = asyncio.get_running_loop()
        total = max(1, round(rate * duration_s))
        first = self.next_seq
        start = loop.time()
        wall_start = time.time()
        sent = 0
        worst_late_s = 0.0
        while sent < total:
            now = loop.time()
            due = min(total, int((now - start) * rate) + 1)
            if due > sent:
                worst_late_s = max(worst_late_s, now - (start + sent / rate))
            while sent < due:
                await self._emit(self.next_seq, wall_start + sent / rate)
                self.next_seq += 1
                sent += 1
            if sent < total:
                await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
        return {
            "sent": total,
            "first_seq": first,
            "last_seq": self.next_seq - 1,
            "elapsed_s": loop.time() - start,
            "worst_late_s": worst_late_s,
        }


class LoopLagMonitor:
    """How late the event loop wakes a 5 ms sleeper: a stall of the loop shows here as lag,
    whatever caused it. Both engine servers run one; `run` answers carry its summary."""

    TICK_S = 0.005

    def __init__(self) -> None:
        self._lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.TICK_S)
            self._lags.append(loop.time() - before - self.TICK_S)

    def take(self) -> dict[str, float | None]:
        lags, self._lags = sorted(self._lags), []
        if not lags:
            return {"loop_lag_p99_ms": None, "loop_lag_max_ms": None}
        return {
            "loop_lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1000,
            "loop_lag_max_ms": lags[-1] * 1000,
        }
