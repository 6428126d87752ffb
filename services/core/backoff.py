"""Exponential backoff with full jitter, for every retry loop in the services."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(initial_s: float, maximum_s: float) -> Iterator[float]:
    """Delays drawn uniformly from [0, cap], the cap doubling up to `maximum_s`: pods that lost
    Pub/Sub at the same moment do not all come back at the same moment (full jitter)."""
    cap = initial_s
    while True:
        yield random.uniform(0.0, cap)
        cap = min(cap * 2, maximum_s)
