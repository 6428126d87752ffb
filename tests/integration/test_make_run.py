"""`make run` for real, in its own process group on free ports, as a supervisor or a terminal
runs it: it honours the user's settings, and every way of stopping it leaves no process and no
open port behind (SIGTERM to the group twice, as GNU make forwards it; SIGINT again and again;
a signal while it is still starting; SIGKILL, which the children must not outlive).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from devtools.cluster import free_port, port_open
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
BANNER_END = "Ctrl-C stops everything."
UP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
# The outer make's job server and level are not ours to pass on.
MAKE_VARIABLES = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")

Proc = tuple[int, int]  # (pid, start time in clock ticks): a pid reused later is not ours


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) from /proc, or None once the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> set[Proc]:
    """Every process below `root`, whatever session or group it moved to."""
    children: dict[int, list[Proc]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found: set[Proc] = set()
    todo = [root]
    while todo:
        for proc in children.get(todo.pop(), []):
            found.add(proc)
            todo.append(proc[0])
    return found


def alive(proc: Proc) -> bool:
    stat = _stat(proc[0])
    return stat is not None and stat[2] == proc[1] and stat[0] not in ("Z", "X")


class MakeRun:
    """One `make run` in a process group of its own, its output in a file."""

    def __init__(self, log: Path, **env: str) -> None:
        self.lb_port, self.api_port, self.emulator_port = free_port(), free_port(), free_port()
        self.socket_ports = (free_port(), free_port())
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in MAKE_VARIABLES},
            "LB_PORT": str(self.lb_port),
            "API_PORT": str(self.api_port),
            "SOCKET_PORTS": ",".join(map(str, self.socket_ports)),
            "EMULATOR_PORT": str(self.emulator_port),
            **env,
        }
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.tree: set[Proc] = set()

    @property
    def all_ports(self) -> list[int]:
        return [self.lb_port, self.api_port, *self.socket_ports, self.emulator_port]

    @property
    def lb_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                ["make", "--no-print-directory", "run"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def note_tree(self) -> None:
        assert self.popen is not None
        self.tree |= descendants(self.popen.pid)

    def wait_up(self) -> None:
        """Until the banner is printed (everything is ready then); notes the process tree."""
        assert self.popen is not None
        try:
            wait_until(
                lambda: BANNER_END in self.output() or not self.running,
                UP_TIMEOUT_S,
                "make run to be up",
            )
        except TimeoutError:
            raise AssertionError(f"make run did not come up:\n{self.output()}") from None
        assert self.running, f"make run exited:\n{self.output()}"
        assert all(port_open(p) for p in self.all_ports), self.output()
        self.note_tree()

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def assert_stopped_cleanly(self, timeout_s: float = STOP_TIMEOUT_S) -> float:
        """make run exits, every port closes, every process of its tree is gone; the seconds."""
        assert self.popen is not None
        started = time.monotonic()
        deadline = started + timeout_s
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"make run still running:\n{self.output()}") from None

        def clean() -> bool:
            return not any(port_open(p) for p in self.all_ports) and not any(
                alive(p) for p in self.tree
            )

        try:
            wait_until(clean, max(1.0, deadline - time.monotonic()), "every port and process")
        except TimeoutError:
            ports = [p for p in self.all_ports if port_open(p)]
            procs = [_cmdline(p) for p in self.tree if alive(p)]
            raise AssertionError(
                f"left behind: ports {ports}, processes {procs}\n{self.output()}"
            ) from None
        return time.monotonic() - started

    def kill_leftovers(self) -> None:
        """Whatever a test left: SIGKILL to make's group and to every process noted, and the
        log folder that a killed make run could not remove."""
        self.signal(signal.SIGKILL)
        for proc in self.tree:
            if alive(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc[0], signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        logs = re.search(r"logs in (\S+)\)", self.output())
        if logs is not None and Path(logs[1]).name.startswith("pubsock-"):
            shutil.rmtree(logs[1], ignore_errors=True)


def _cmdline(proc: Proc) -> str:
    try:
        return Path(f"/proc/{proc[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return str(proc[0])


StartMakeRun = Callable[..., MakeRun]


@pytest.fixture
def make_run(tmp_path: Path) -> Iterator[StartMakeRun]:
    """Starts `make run`s on free ports (MakeRun(**env)); kills what a failed test leaves."""
    runs: list[MakeRun] = []

    def factory(**env: str) -> MakeRun:
        run = MakeRun(tmp_path / f"make-run-{len(runs)}.log", **env)
        runs.append(run)
        run.start()
        return run

    yield factory
    for run in runs:
        run.kill_leftovers()


def test_user_settings_win_over_the_demo_defaults(make_run: StartMakeRun) -> None:
    """A user's key publishes (202), the user's TOKEN_SECRET signs the demo tokens, the user's
    ALLOWED_ORIGINS refuses another origin; the output names them but never prints them."""
    key, secret = f"my-key-{secrets.token_hex(8)}", f"my-secret-{secrets.token_hex(16)}"
    run = make_run(API_KEYS=key, TOKEN_SECRET=secret, ALLOWED_ORIGINS="http://mine.example")
    run.wait_up()
    with httpx.Client(base_url=run.lb_url, timeout=10) as http:
        published = http.post(
            "/v1/channels/demo:mine/messages",
            json={"data": {"text": "hi"}},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert published.status_code == 202, published.text
        assert http.post("/v1/channels/demo:mine/messages", json={"data": 1}).status_code == 401
        demo = http.post("/demo/token", json={"name": "ann"})
        assert demo.status_code == 200, demo.text
        assert jwt.decode(demo.json()["token"], secret, algorithms=["HS256"])["sub"] == "ann"
        handshake = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        token = demo.json()["token"]
        other = http.get(f"/ws?token={token}", headers={**handshake, "Origin": "http://x.example"})
        assert other.status_code == 403, other.text
    output = run.output()
    assert key not in output and secret not in output
    assert "your API_KEYS" in output and "your TOKEN_SECRET" in output
    run.signal(signal.SIGTERM)
    run.assert_stopped_cleanly()


def test_sigterm_twice_to_the_group(make_run: StartMakeRun) -> None:
    """A supervisor's SIGTERM to the group, at once again (make forwards each to its child)."""
    run = make_run()
    run.wait_up()
    run.signal(signal.SIGTERM)
    run.signal(signal.SIGTERM)
    run.assert_stopped_cleanly()


def test_sigint_again_and_again(make_run: StartMakeRun) -> None:
    """Ctrl-C held down: SIGINT to the group as fast as it can be sent, for half a second."""
    run = make_run()
    run.wait_up()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and run.running:
        run.signal(signal.SIGINT)
    run.assert_stopped_cleanly()


def test_sigterm_while_starting(make_run: StartMakeRun) -> None:
    """Stopped halfway through its start (the emulator up, the rest not yet): nothing stays."""
    run = make_run()
    emulator = run.emulator_port
    wait_until(lambda: port_open(emulator) or not run.running, UP_TIMEOUT_S, "the emulator")
    run.note_tree()
    assert BANNER_END not in run.output()
    run.signal(signal.SIGTERM)
    run.signal(signal.SIGTERM)
    run.assert_stopped_cleanly()
    assert BANNER_END not in run.output()  # it stopped the start, not a finished cluster


def test_sigkill_takes_every_child_along(make_run: StartMakeRun) -> None:
    """SIGKILL to make run's group: its children (the emulator's JVM too) die with it."""
    run = make_run()
    run.wait_up()
    run.signal(signal.SIGKILL)
    run.assert_stopped_cleanly(timeout_s=15)
