"""How the bench talks to the processes it starts: one JSON object a line.

A child reads commands on its stdin and answers each with one line on a private copy of its
stdout (fd 1 itself is pointed at stderr, so nothing a library prints can corrupt the stream).
A child exits when its stdin closes: if the bench dies, every child it started follows.

The parent side (`Child`) starts a child in its own process group, reads answers with deadlines
and stops the whole group (SIGTERM, then SIGKILL) whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
CHILD_MAX_LIFETIME_S = 1200.0  # no child outlives a bench run, even one stuck in a command

Command = dict[str, Any]
Reply = dict[str, Any]

log = logging.getLogger("bench")


# -- child side --------------------------------------------------------------------------------
def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (10,000 connections need as many descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _ReplyStream:
    def __init__(self) -> None:
        fd = os.dup(1)
        os.dup2(2, 1)
        self._out = os.fdopen(fd, "wb", buffering=0)

    def write(self, reply: Reply) -> None:
        self._out.write(orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")


def _child_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )


def _error_reply(exc: BaseException) -> Reply:
    traceback.print_exception(exc, file=sys.stderr)
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


async def serve(handler: Callable[[Command], Awaitable[Reply]], hello: Reply) -> None:
    """Answers commands on stdin until it closes, `{"cmd": "exit"}` or the lifetime bound."""
    _child_logging()
    replies = _ReplyStream()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    replies.write({"ok": True, "pid": os.getpid(), **hello})
    deadline = loop.time() + CHILD_MAX_LIFETIME_S
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - loop.time()))
        except TimeoutError:
            return
        if not line:
            return
        command = orjson.loads(line)
        if command.get("cmd") == "exit":
            replies.write({"ok": True})
            return
        try:
            reply = await handler(command)
            reply.setdefault("ok", True)
        except Exception as exc:
            reply = _error_reply(exc)
        replies.write(reply)


def serve_blocking(handler: Callable[[Command], Reply], hello: Reply) -> None:
    """`serve` for children without an event loop (the Google client's own threads do the work)."""
    _child_logging()
    replies = _ReplyStream()
    replies.write({"ok": True, "pid": os.getpid(), **hello})
    deadline = time.monotonic() + CHILD_MAX_LIFETIME_S
    fd = sys.stdin.fileno()
    buffer = b""
    while time.monotonic() < deadline:
        if b"\n" not in buffer:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return
            buffer += chunk
            continue
        line, buffer = buffer.split(b"\n", 1)
        command = orjson.loads(line)
        if command.get("cmd") == "exit":
            replies.write({"ok": True})
            return
        try:
            reply = handler(command)
            reply.setdefault("ok", True)
        except Exception as exc:
            reply = _error_reply(exc)
        replies.write(reply)


# -- parent side -------------------------------------------------------------------------------
class ChildError(RuntimeError):
    pass


class Child:
    """A bench child process (`python -m <module> ...`) in its own process group."""

    def __init__(
        self,
        name: str,
        module: str,
        args: Iterable[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", module, *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.hello: Reply = {}
        self._buffer = b""

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, timeout_s: float = 60.0) -> Reply:
        self.launch()
        return self.wait_started(timeout_s)

    def wait_started(self, timeout_s: float = 60.0) -> Reply:
        self.hello = self.recv(timeout_s)
        return self.hello

    def launch(self) -> None:
        """Starts the process without waiting for its first line (start several at once)."""
        with self.log_path.open("ab") as log_file:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,
                cwd=ROOT,
            )

    def send(self, command: Command) -> None:
        assert self.popen is not None and self.popen.stdin is not None
        try:
            self.popen.stdin.write(orjson.dumps(command) + b"\n")
            self.popen.stdin.flush()
        except BrokenPipeError:
            raise ChildError(f"{self.name} is gone:\n{self.log_tail()}") from None

    def recv(self, timeout_s: float) -> Reply:
        assert self.popen is not None and self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"{self.name}: no answer within {timeout_s:.0f}s")
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                if self.popen.poll() is not None:
                    raise ChildError(f"{self.name} exited:\n{self.log_tail()}")
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise ChildError(f"{self.name} closed its output:\n{self.log_tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = orjson.loads(line)
        if not reply.get("ok", False):
            raise ChildError(f"{self.name}: {reply.get('error')}\n{self.log_tail()}")
        return reply

    def call(self, command: Command, timeout_s: float = 60.0) -> Reply:
        self.send(command)
        return self.recv(timeout_s)

    def stop(self) -> None:
        """Asks politely (stdin closed), then SIGTERM, then SIGKILL to the whole group."""
        popen = self.popen
        if popen is None:
            return
        with contextlib.suppress(OSError):
            if popen.stdin is not None:
                popen.stdin.close()
        try:
            popen.wait(3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)  # the group may hold stray children
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5)
        if popen.stdout is not None:
            popen.stdout.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def call_all(
    children: Iterable[Child], command: Command | list[Command], timeout_s: float = 60.0
) -> list[Reply]:
    """Sends to every child first, then collects: the children work at the same time."""
    children = list(children)
    commands = command if isinstance(command, list) else [command] * len(children)
    for child, cmd in zip(children, commands, strict=True):
        child.send(cmd)
    deadline = time.monotonic() + timeout_s
    return [child.recv(max(0.1, deadline - time.monotonic())) for child in children]
