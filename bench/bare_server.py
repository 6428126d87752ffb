"""`python -m bench.bare_server`: the baseline. A plain `websockets` asyncio server that encodes
each message once with orjson and hands it to `websockets.broadcast()`.

It speaks just enough of the pubsock protocol for the same clients to drive it: a `subscribe`
frame gets a `subscribed` frame, and with `since` the newer of its last 1,000 messages first
(the baseline of the recovery storm). Everything is written without an `await`, so a broadcast
can never slip between a replay and joining the live set. Nothing else: it is kept as simple as
the library makes it, and never weakened (default settings except `compression=None`, which the
clients do not negotiate anyway, and the pod's listen backlog).

Commands: `run {rate, duration_s}`, `burst {count}`, `stats`, `exit`.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from typing import Any

import orjson
import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

from bench import control
from bench.generator import BURST_RATE, LoopLagMonitor, PacedGenerator, message_data
from services.core.ids import new_message_id

RECENT_SIZE = 1000  # = the pod's HISTORY_SIZE


async def main(args: argparse.Namespace) -> None:
    nofile = control.raise_nofile_limit()
    channel = args.channel
    live: set[ServerConnection] = set()
    recent: deque[tuple[str, bytes]] = deque(maxlen=RECENT_SIZE)

    async def handler(connection: ServerConnection) -> None:
        try:
            async for raw in connection:
                frame = orjson.loads(raw)
                if frame.get("type") != "subscribe":
                    continue
                since = frame.get("since")
                replay: list[bytes] = []
                found = False
                if since is not None:
                    for index in range(len(recent) - 1, -1, -1):
                        if recent[index][0] == since:
                            found = True
                            replay = [recent[i][1] for i in range(index + 1, len(recent))]
                            break
                subscribed: dict[str, Any] = {
                    "type": "subscribed",
                    "channel": channel,
                    "position": recent[-1][0] if recent else f"@{int(time.time() * 1000)}",
                }
                if since is not None:
                    subscribed["recovered"] = found
                broadcast([connection], orjson.dumps(subscribed), text=True)
                for payload in replay:
                    broadcast([connection], payload, text=True)
                live.add(connection)
        finally:
            live.discard(connection)

    async def emit(seq: int, scheduled_s: float) -> None:
        message_id = new_message_id()
        payload = orjson.dumps(
            {
                "type": "message",
                "channel": channel,
                "id": message_id,
                "data": message_data(seq, scheduled_s),
                "ts": int(time.time() * 1000),
            }
        )
        recent.append((message_id, payload))
        broadcast(live, payload, text=True)

    generator = PacedGenerator(emit)
    monitor = LoopLagMonitor()
    monitor.start()

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        name = command["cmd"]
        if name == "run":
            monitor.take()
            result = await generator.run(float(command["rate"]), float(command["duration_s"]))
            return {**result, **monitor.take()}
        if name == "burst":
            result = await generator.run(BURST_RATE, int(command["count"]) / BURST_RATE)
            return {**result, "last_id": recent[-1][0], "in_history": True}
        if name == "stats":
            return {"sessions": len(live), "subscribers": len(live)}
        raise ValueError(f"unknown command {name!r}")

    async with serve(handler, "127.0.0.1", 0, compression=None, backlog=4096) as server:
        port = server.sockets[0].getsockname()[1]
        await control.serve(handle, {"port": port, "nofile": nofile, "server": "bare"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--channel", default="bench")
    uvloop.run(main(parser.parse_args()))
