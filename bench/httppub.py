"""`python -m bench.httppub --url http://127.0.0.1:PORT`: posts messages to the publish API at a
fixed rate (the full path's producer), one request per message, as many in flight as it takes.

Every message's `data` carries its seq and scheduled send time (bench.generator), so a client
of a socket pod measures publish-to-deliver latency. The answer of a `run` lists, per accepted
message, when it was sent and when its 202 came back: the bench checks the contract's ordering
guarantee with it (if A's 202 came back before B was sent, A is delivered first).

Commands: `run {channel, channels, rate, duration_s}` (message n goes to `<channel>-<n % channels>`,
or to `<channel>` itself when channels is 1), `exit`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from array import array
from typing import Any
from urllib.parse import urlsplit

import orjson
import uvloop

from bench import control
from bench.generator import PacedGenerator, message_data
from bench.stats import quantiles

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT_S = 15.0


class HttpPool:
    """Keep-alive HTTP/1.1 connections, one request at a time each, opened as needed.

    Deliberately minimal (a general client added seconds of queueing at 100 requests/s here):
    a request head, a body, a status line, headers, `Content-Length` bytes of body."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._open = 0
        self._available = asyncio.Condition()

    async def _acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with self._available:
            while not self._idle and self._open >= MAX_CONNECTIONS:
                await self._available.wait()
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return await asyncio.open_connection(self._host, self._port)
        except OSError:
            await self._discard()
            raise

    async def _release(self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        async with self._available:
            self._idle.append(connection)
            self._available.notify()

    async def _discard(self) -> None:
        async with self._available:
            self._open -= 1
            self._available.notify()

    async def post(self, path: str, body: bytes) -> int:
        connection = await self._acquire()
        reader, writer = connection
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status = int((await reader.readline()).split(b" ", 2)[1])
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            writer.close()
            await self._discard()
            raise
        await self._release(connection)
        return status

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()


async def main(args: argparse.Namespace) -> None:
    pool = HttpPool(args.url)
    records: list[tuple[int, float, float, str]] = []
    statuses: dict[str, int] = {}
    latencies = array("d")
    pending: set[asyncio.Task[None]] = set()
    channels = ["bench"]

    async def post(seq: int, scheduled_s: float) -> None:
        channel = channels[seq % len(channels)]
        body = orjson.dumps({"data": message_data(seq, scheduled_s)})
        sent_at = time.time()
        try:
            code = await asyncio.wait_for(
                pool.post(f"/v1/channels/{channel}/messages", body), REQUEST_TIMEOUT_S
            )
            status = str(code)
        except (OSError, ValueError, IndexError, TimeoutError, asyncio.IncompleteReadError) as exc:
            status = type(exc).__name__
        acked_at = time.time()
        statuses[status] = statuses.get(status, 0) + 1
        if status == "202":
            records.append((seq, sent_at, acked_at, channel))
            latencies.append(acked_at - sent_at)

    async def emit(seq: int, scheduled_s: float) -> None:
        task = asyncio.get_running_loop().create_task(post(seq, scheduled_s))
        pending.add(task)
        task.add_done_callback(pending.discard)

    generator = PacedGenerator(emit)

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        nonlocal channels, latencies
        if command["cmd"] != "run":
            raise ValueError(f"unknown command {command['cmd']!r}")
        count = int(command.get("channels", 1))
        prefix = command["channel"]
        channels = [prefix] if count == 1 else [f"{prefix}-{i}" for i in range(count)]
        records.clear()
        statuses.clear()
        latencies = array("d")
        result = await generator.run(float(command["rate"]), float(command["duration_s"]))
        if pending:
            await asyncio.wait(set(pending), timeout=REQUEST_TIMEOUT_S + 5)
        return {
            **result,
            "accepted": len(records),
            "statuses": dict(statuses),
            "http_latency": quantiles(latencies),
            "records": sorted(records),
        }

    try:
        await control.serve(handle, {"role": "http-publisher"})
    finally:
        await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    uvloop.run(main(parser.parse_args()))
