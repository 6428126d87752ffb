"""Latency summaries that several processes can merge, and CPU/memory readings of a process."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psutil

SKETCH_POINTS = 1001  # quantiles at every 0.1 %: merged percentiles are exact to 0.1 %


def quantiles(samples: Sequence[float]) -> dict[str, Any]:
    """A mergeable summary of latency samples (seconds)."""
    count = len(samples)
    if count == 0:
        return {"count": 0, "sketch": [], "max": None, "mean": None}
    ordered = sorted(samples)
    last = count - 1
    sketch = [ordered[round(i * last / (SKETCH_POINTS - 1))] for i in range(SKETCH_POINTS)]
    return {"count": count, "sketch": sketch, "max": ordered[-1], "mean": sum(ordered) / count}


def merge(summaries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Percentiles (milliseconds) of the union of several `quantiles` summaries."""
    points: list[tuple[float, float]] = []
    total = 0
    worst = None
    weighted_sum = 0.0
    for summary in summaries:
        count = summary.get("count", 0)
        if not count:
            continue
        total += count
        weighted_sum += summary["mean"] * count
        worst = summary["max"] if worst is None else max(worst, summary["max"])
        weight = count / len(summary["sketch"])
        points.extend((value, weight) for value in summary["sketch"])
    if not total:
        return {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    points.sort()

    def percentile(level: float) -> float:
        target = level * total
        running = 0.0
        for value, weight in points:
            running += weight
            if running >= target:
                return value * 1000
        return points[-1][0] * 1000

    return {
        "count": total,
        "p50_ms": percentile(0.50),
        "p90_ms": percentile(0.90),
        "p99_ms": percentile(0.99),
        "max_ms": worst * 1000,
        "mean_ms": weighted_sum / total * 1000,
    }


def exact(samples: Sequence[float]) -> dict[str, Any]:
    """Percentiles (ms) of one process's samples (seconds)."""
    return merge([quantiles(samples)])


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of these processes so far (0 for one that is gone)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def rss_bytes(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


class CpuMeter:
    """CPU seconds of some processes between `start()` and `stop()`."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)
        self._start = 0.0
        self.seconds = 0.0

    def start(self) -> CpuMeter:
        self._start = cpu_seconds(self.pids)
        return self

    def stop(self) -> float:
        self.seconds = cpu_seconds(self.pids) - self._start
        return self.seconds
