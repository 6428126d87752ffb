"""Waiting for a condition with a deadline: the one helper of the dev tooling and the tests.

`wait_until` (blocking) and `eventually` (asyncio) call `predicate` until `until(value)` is true
(by default: until the value itself is) and return that value. At the deadline they raise
`WaitTimeout`, which names what was awaited and the last value seen; it is a TimeoutError (what
the tooling catches) and an AssertionError (what a test fails with). The predicate is checked once
more at the deadline, and at least once whatever the timeout; an exception it raises ends the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 15.0
# Blocking waits poll processes and ports; asyncio waits mostly poll state in this process.
POLL_INTERVAL_S = 0.05
ASYNC_INTERVAL_S = 0.01


class WaitTimeout(TimeoutError, AssertionError):
    """A wait ran into its deadline."""


class Interrupted(Exception):
    """A wait gave up because a stop was requested meanwhile (`abort` returned True)."""


def never() -> bool:
    return False


def _timed_out(message: str, timeout: float, last: object) -> WaitTimeout:
    return WaitTimeout(f"timed out after {timeout:g}s waiting for {message}; last seen: {last!r}")


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    message: str = "a condition",
    *,
    interval_s: float = POLL_INTERVAL_S,
    until: Callable[[T], object] = bool,
    abort: Callable[[], bool] = never,
) -> T:
    """Polls `predicate` (blocking) until `until(value)`; returns the value. Raises WaitTimeout
    at the deadline, or Interrupted as soon as `abort()` is true."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if until(value):
            return value
        if abort():
            raise Interrupted(f"stopped while waiting for {message}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timed_out(message, timeout_s, value)
        time.sleep(min(interval_s, remaining))


async def eventually(
    predicate: Callable[[], T | Awaitable[T]],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    message: str = "a condition",
    *,
    interval_s: float = ASYNC_INTERVAL_S,
    until: Callable[[T], object] = bool,
    wake: asyncio.Event | None = None,
) -> T:
    """Calls `predicate` (a function, or a coroutine function: its result is awaited) until
    `until(value)`; returns the value. With `wake`, an event set whenever what the predicate
    looks at changes, it checks again at once instead of after `interval_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if wake is not None:
            wake.clear()  # a change from here on wakes the wait below
        result = predicate()
        value = cast(T, await result) if inspect.isawaitable(result) else result
        if until(value):
            return value
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise _timed_out(message, timeout_s, value)
        if wake is None:
            await asyncio.sleep(min(interval_s, remaining))
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(interval_s, remaining)):
                    await wake.wait()
