"""Drives `driver.mjs` (real socket.io-client sockets in Node) from pytest, and waits on what they
report. Every record the Node process prints is kept, in arrival order."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from devtools.node import npm_ci
from tests.support import DEFAULT_TIMEOUT_S, WaitTimeout, eventually

HERE = Path(__file__).resolve().parent

Record = dict[str, Any]


def install_node_modules() -> None:
    """`npm ci` from package-lock.json when node_modules is missing."""
    npm_ci(HERE, ("socket.io-client",), "tests/socketio (Node 18+)")


class SioDriver:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.records: list[Record] = []
        self._changed = asyncio.Event()
        self._refs = itertools.count(1)
        self._reader = asyncio.create_task(self._read())
        self._errors = asyncio.create_task(self._read_stderr())
        self.stderr: list[str] = []

    @classmethod
    async def start(cls) -> SioDriver:
        process = await asyncio.create_subprocess_exec(
            shutil.which("node") or "node",
            str(HERE / "driver.mjs"),
            cwd=HERE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
        return cls(process)

    async def _read(self) -> None:
        assert self._process.stdout is not None
        while line := await self._process.stdout.readline():
            self.records.append(orjson.loads(line))
            self._changed.set()

    async def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        while line := await self._process.stderr.readline():
            self.stderr.append(line.decode(errors="replace"))

    async def _send(self, command: Record) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(orjson.dumps(command) + b"\n")
        await self._process.stdin.drain()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._send({"cmd": "exit"})
        try:
            await asyncio.wait_for(self._process.wait(), 5)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
        self._reader.cancel()
        self._errors.cancel()

    # -- waiting -----------------------------------------------------------------------------
    async def wait_for(
        self,
        predicate: Callable[[Record], bool],
        what: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        since: int = 0,
    ) -> Record:
        """The first record (from index `since`) matching `predicate`."""
        seen = since

        def first_match() -> Record | None:
            nonlocal seen
            for record in self.records[seen:]:
                if record.get("ev") == "error":
                    raise AssertionError(f"driver error: {record['message']}")
                if predicate(record):
                    return record
            seen = len(self.records)
            return None

        try:
            # Every record sets _changed: the check runs again as soon as one arrives.
            found = await eventually(first_match, timeout, what, interval_s=0.5, wake=self._changed)
        except WaitTimeout as exc:
            raise WaitTimeout(
                f"{exc}; last records: {self.records[-10:]}; stderr: {''.join(self.stderr[-20:])}"
            ) from None
        assert found is not None
        return found

    async def wait_until(
        self, check: Callable[[], bool], what: str, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if not check():
            await self.wait_for(lambda _: check(), what, timeout, since=len(self.records))

    # -- clients -----------------------------------------------------------------------------
    async def connect(self, name: str, url: str, **opts: Any) -> Record:
        """Opens a socket.io client; returns its first `connect` or `connect_error` record."""
        start = len(self.records)
        await self._send({"cmd": "connect", "name": name, "url": url, "opts": opts})
        return await self.wait_for(
            lambda r: r.get("name") == name and r["ev"] in ("connect", "connect_error"),
            f"{name} to connect",
            since=start,
        )

    async def emit(self, name: str, event: str, *args: Any, timeout_ms: int = 10000) -> Any:
        """Emits with an ack; returns the ack's argument (raises on an ack timeout)."""
        ref = next(self._refs)
        await self._send(
            {
                "cmd": "emit",
                "name": name,
                "event": event,
                "args": list(args),
                "ref": ref,
                "timeoutMs": timeout_ms,
            }
        )
        record = await self.wait_for(
            lambda r: r["ev"] == "ack" and r.get("ref") == ref, f"the ack of {event} from {name}"
        )
        if record["err"] is not None:
            raise AssertionError(f"{name} {event}: {record['err']}")
        return record["res"]

    async def close(self, name: str) -> None:
        await self._send({"cmd": "close", "name": name})
        await self.wait_for(lambda r: r["ev"] == "closed" and r["name"] == name, f"{name} closed")

    async def drop(self, name: str) -> None:
        start = len(self.records)
        await self._send({"cmd": "drop", "name": name})
        await self.wait_for(
            lambda r: r["ev"] == "disconnect" and r["name"] == name, f"{name} dropped", since=start
        )

    def last_offset(self, name: str) -> str:
        """The offset the client keeps: the last string argument of the last event it got."""
        events = [r["args"] for r in self.of(name, "event") if r["args"]]
        offset = events[-1][-1] if events else None
        assert isinstance(offset, str), events[-1:]
        return offset

    async def set_offset(self, name: str, offset: str) -> None:
        start = len(self.records)
        await self._send({"cmd": "offset", "name": name, "offset": offset})
        await self.wait_for(
            lambda r: r["ev"] == "offset" and r["name"] == name, f"{name}'s offset", since=start
        )

    async def reconnected(self, name: str, since: int) -> Record:
        return await self.wait_for(
            lambda r: r["ev"] in ("connect", "connect_error") and r["name"] == name,
            f"{name} to reconnect",
            since=since,
        )

    # -- what a client saw -------------------------------------------------------------------
    def of(self, name: str, ev: str) -> list[Record]:
        return [r for r in self.records if r.get("name") == name and r["ev"] == ev]

    def messages(self, name: str, room: str, event: str = "message") -> list[list[Any]]:
        """The args of every `event` the client received from `room` (data, meta, offset)."""
        return [
            r["args"]
            for r in self.of(name, "event")
            if r["event"] == event and r["args"][1].get("channel") == room
        ]

    def message_ids(self, name: str, room: str) -> list[str]:
        return [args[1]["id"] for args in self.messages(name, room)]

    async def wait_messages(
        self, name: str, room: str, count: int, timeout: float = DEFAULT_TIMEOUT_S
    ) -> list[str]:
        await self.wait_until(
            lambda: len(self.message_ids(name, room)) >= count,
            f"{count} messages of {room} at {name}",
            timeout,
        )
        return self.message_ids(name, room)
