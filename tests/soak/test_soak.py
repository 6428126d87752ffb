"""A short soak with a fixed seed (`make soak` is the long one): 60 clients of every kind through
the load balancer, steady publishing, random faults; the checker finds no violation and nothing
is left running. At most 3 minutes of wall time, start-up included."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.cluster import ROOT
from tests.support import emulator_missing, require

pytestmark = pytest.mark.integration

SEED = 14
WALL_LIMIT_S = 180


def _missing() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "Node and npm are required"
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        return "HAProxy is required"
    return emulator_missing()


@pytest.mark.timeout(WALL_LIMIT_S + 60)
def test_a_short_soak_with_a_fixed_seed_finds_nothing_wrong(tmp_path: Path) -> None:
    require(_missing(), "the soak")
    out = tmp_path / "soak"
    started = time.monotonic()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtools.soak",
            "--seconds=70",
            f"--seed={SEED}",
            "--clients=60",
            "--fault-gap=5",
            f"--out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WALL_LIMIT_S + 45,
    )
    wall = time.monotonic() - started
    output = run.stdout + run.stderr
    assert run.stdout.startswith(f"SOAK_SEED={SEED}\n"), output[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["violations"] == [], output[-6000:]
    assert report["leftovers"] == {"processes": [], "ports": []}
    assert run.returncode == 0, output[-3000:]
    assert len(report["faults"]) >= 5  # the nemesis did its job
    assert report["check"]["deliveries"] > 5000
    # Its wall time is bounded by the timeouts above (a hang guard), not asserted: speed is for
    # make bench, and a slow machine must not turn a correct run red.
    print(f"short soak: {wall:.0f} s wall")
