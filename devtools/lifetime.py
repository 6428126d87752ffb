"""How `make run` and its children end, whatever signals arrive and however often.

`StopSignals`: SIGINT and SIGTERM are blocked and read (sigpending, sigwait) instead of handled.
No Python signal handler runs, so no signal can interrupt another's handler. The old handler
called `threading.Event.set()`; GNU make forwards a SIGTERM sent to its group, so a second signal
came while the first handler held the Event's lock, and its own `set()` blocked on that lock
forever (or, in a burst, nested until RecursionError) and orphaned every child.

`die_with_parent`: a child started with it is killed when the process that started it dies, by
any means, SIGKILL included (Linux: prctl PR_SET_PDEATHSIG). It reaches that child only, not its
own children: start a program through a script that execs it, so the long-lived process is the
child itself (the emulator's JVM is).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class StopSignals:
    """SIGINT and SIGTERM as pending signals of this process, looked at when it suits.

    Create it before any child or thread: both inherit the blocked signals (children started
    with `die_with_parent` unblock them). Signals that arrive once a stop is under way stay
    pending and are dropped at exit: repeating Ctrl-C cannot break the stop."""

    def __init__(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        self.received: int | None = None

    def requested(self) -> bool:
        """True once SIGINT or SIGTERM has arrived (without waiting)."""
        if self.received is None:
            pending = signal.sigpending() & STOP_SIGNALS
            if pending:
                self.received = int(min(pending))
        return self.received is not None

    def wait(self) -> int:
        """Blocks until SIGINT or SIGTERM arrives; the signal's number."""
        if self.received is None:
            self.received = int(signal.sigwait(STOP_SIGNALS))
        return self.received


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for Popen: the child gets SIGKILL when its parent dies, and starts with no
    blocked signal (it must see the SIGTERM it is sent).

    The kernel sends it when the *thread* that started the child ends: start children from the
    main thread, or from one that lives as long as they do."""
    parent = os.getpid()

    def preexec() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl: too late for the signal
                os._exit(1)

    return preexec
