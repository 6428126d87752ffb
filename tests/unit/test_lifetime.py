"""devtools/lifetime.py in processes of their own: signals read, never handled, however many
arrive; a child dies with its parent, even a SIGKILLed one, and sees the signals it is sent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]

WAITER = """
import sys, time
from devtools.lifetime import StopSignals
stop = StopSignals()
print("ready", flush=True)
print("got", stop.wait(), flush=True)
end = time.monotonic() + 0.3  # more signals while "stopping": they must change nothing
while time.monotonic() < end:
    assert stop.requested()
print("stopped", flush=True)
"""

PARENT = """
import subprocess, sys, time
from devtools.lifetime import StopSignals, die_with_parent
StopSignals()
child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent(), start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def python() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(started: list[subprocess.Popen[str]], code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    started.append(proc)
    return proc


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def test_a_storm_of_signals_is_read_once(python: list[subprocess.Popen[str]]) -> None:
    """Thousands of SIGINTs and SIGTERMs: one is taken, the rest are ignored, exit 0."""
    proc = start(python, WAITER)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    end = time.monotonic() + 0.5
    while time.monotonic() < end and proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert out.splitlines()[-1] == "stopped"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_sigkilled_parent(python: list[subprocess.Popen[str]]) -> None:
    proc = start(python, PARENT)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    status = Path(f"/proc/{child}/status").read_text()
    assert "SigBlk:\t0000000000000000" in status  # it will see the SIGTERM it is sent
    proc.kill()
    proc.wait()
    try:
        wait_until(lambda: gone(child), 5, "the child to die with its parent")
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)
