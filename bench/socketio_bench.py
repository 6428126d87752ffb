"""Other kinds of session next to native websockets, on one socket pod: socket.io and
Server-Sent Events.

`python -m bench.socketio_bench [--clients 200] [--messages 1000] [--rate 100] [--rounds 2]
[--kinds native,socket.io]` (kinds: native, socket.io, sse, sse-10ch)

One real `Pod` on the in-process memory broker (a child process), N clients on one channel in
another child process, all of one kind:
- `native`: websocket clients (`/ws`, subscribe);
- `socket.io`: socket.io clients over the websocket transport (`/socket.io/?EIO=4&transport=
  websocket`, CONNECT, `join`, answering Engine.IO pings; raw frames, no socket.io-client
  library, so the client side costs about the same);
- `sse`: `GET /sse?channels=bench` streams, read raw (messages counted by their `data:` line);
- `sse-10ch`: the same with nine more (quiet) channels on each stream, so every event's `id:`
  line carries ten positions: what the per-session id costs as it grows.
The pod publishes M messages at a steady rate (or in a burst) exactly as the api would
(Envelope, ordering key = channel); the run ends when every client has every message. Per kind:
deliveries per wall second, the pod's CPU-µs per delivery (user + system) and deliveries per
pod CPU-second. Kinds are interleaved (A, B, B, A, ...) so a change in the machine's load hits
every kind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import orjson

CHANNEL = "bench"
TEXT = "the quick brown fox jumps over the lazy dog"
KINDS = ("native", "socket.io", "sse", "sse-10ch")
SSE_MESSAGE = b'data: {"type":"message"'
# The quiet channels of `sse-10ch`: names as long as the bench channel's typical peers.
QUIET_CHANNELS = [f"bench-quiet-{n}" for n in range(1, 10)]


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _out(record: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()


async def _lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


# -- the pod -----------------------------------------------------------------------------------
async def serve() -> None:
    from services.core.broker import OutgoingMessage
    from services.core.broker.memory import MemoryBroker
    from services.core.envelope import Envelope
    from services.core.ids import new_message_id
    from services.socket.pod import Pod
    from services.socket.settings import SocketSettings

    settings = SocketSettings(
        broker="memory",
        host="127.0.0.1",
        port=0,
        pod_name="bench",
        log_level="WARNING",
        max_connections=100000,
        send_buffer_max_bytes=64 * 1024 * 1024,
        warm_start_timeout_s=2,
        socketio_ping_interval_s=600,
    )
    broker = MemoryBroker()
    pod = Pod(settings, broker)
    await pod.start()
    _out({"port": pod.port})
    reader = await _lines()
    while line := await reader.readline():
        command = orjson.loads(line)
        if command["cmd"] == "burst":
            start_cpu = _cpu_s()
            rate = command.get("rate") or 0.0
            loop = asyncio.get_running_loop()
            started = loop.time()
            for seq in range(command["count"]):
                if rate:  # paced: message `seq` is due at started + seq / rate
                    delay = started + seq / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                envelope = Envelope(
                    new_message_id(),
                    CHANNEL,
                    {"seq": seq, "t": time.time(), "text": TEXT},
                    int(time.time() * 1000),
                )
                await broker.publish(
                    OutgoingMessage(envelope.encode(), CHANNEL, envelope.attributes())
                )
                if not rate and seq % 100 == 99:
                    await asyncio.sleep(0)  # let the pump and the transports run
            _out({"published": command["count"], "cpu_s": _cpu_s() - start_cpu})
        elif command["cmd"] == "cpu":
            times = os.times()
            _out({"cpu_s": _cpu_s(), "user_s": times.user, "system_s": times.system})
        elif command["cmd"] == "exit":
            break
    os._exit(0)  # the bench measured what it needed; no drain


# -- the clients -------------------------------------------------------------------------------
async def clients(kind: str, url: str, count: int) -> None:
    from websockets.asyncio.client import connect

    done = asyncio.Event()
    expected = 0
    counts = [0] * count
    finished = 0

    async def native(index: int) -> None:
        nonlocal finished
        async with connect(f"{url}/ws", compression=None, max_size=None) as ws:
            await ws.send(orjson.dumps({"type": "subscribe", "channel": CHANNEL}).decode())
            while b'"subscribed"' not in (frame := await ws.recv(decode=False)):
                pass
            subscribed()
            async for frame in ws:
                if frame[:17] == '{"type":"message"':
                    counts[index] += 1
                    if counts[index] == expected:
                        finished += 1
                        if finished == count:
                            done.set()

    async def socketio(index: int) -> None:
        nonlocal finished
        ws_url = url + "/socket.io/?EIO=4&transport=websocket"
        async with connect(ws_url, compression=None, max_size=None) as ws:
            await ws.recv()  # Engine.IO open
            await ws.send("40")
            while not (await ws.recv()).startswith("40"):
                pass
            await ws.send(f'421["join","{CHANNEL}"]')
            while not (await ws.recv()).startswith("431"):
                pass
            subscribed()
            async for frame in ws:
                if frame[:12] == '42["message"':
                    counts[index] += 1
                    if counts[index] == expected:
                        finished += 1
                        if finished == count:
                            done.set()
                elif frame == "2":
                    await ws.send("3")

    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    joined = 0

    def subscribed() -> None:
        nonlocal joined
        joined += 1
        if joined == count:
            ready.set_result(None)

    async def sse(index: int) -> None:
        nonlocal finished
        channels = [CHANNEL] + (QUIET_CHANNELS if kind == "sse-10ch" else [])
        host, port = url.removeprefix("ws://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        query = ",".join(channels)
        writer.write(f"GET /sse?channels={query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = b""
        while head.count(b"event: subscribed") < len(channels):
            chunk = await reader.read(1 << 16)
            if not chunk:
                raise ConnectionError("the stream ended before it was subscribed")
            head += chunk
        subscribed()
        tail = b""
        keep = len(SSE_MESSAGE) - 1
        while chunk := await reader.read(1 << 16):
            data = tail + chunk
            counts[index] += data.count(SSE_MESSAGE)
            tail = data[-keep:]
            if expected and counts[index] >= expected and not done_by[index]:
                done_by[index] = True
                finished += 1
                if finished == count:
                    done.set()
        writer.close()

    run = {"native": native, "socket.io": socketio}.get(kind, sse)
    done_by = [False] * count
    tasks = []
    for index in range(count):
        tasks.append(asyncio.create_task(run(index)))
        if index % 50 == 49:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(ready, 60)
    _out({"ready": count})
    reader = await _lines()
    while line := await reader.readline():
        command = orjson.loads(line)
        if command["cmd"] == "expect":
            expected = command["count"]
            finished = 0
            for index in range(count):
                counts[index] = 0
                done_by[index] = False
            done.clear()
            _out({"armed": True})
            try:
                await asyncio.wait_for(done.wait(), command["timeout_s"])
                _out({"done": time.time(), "received": sum(counts)})
            except TimeoutError:
                _out({"done": None, "received": sum(counts)})
        elif command["cmd"] == "exit":
            break
    os._exit(0)


# -- the bench ---------------------------------------------------------------------------------
class Child:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.socketio_bench", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(orjson.dumps(command) + b"\n")
        self.process.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("a bench child exited early")
        return orjson.loads(line)

    def stop(self) -> None:
        try:
            self.send({"cmd": "exit"})
            self.process.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(5)


def measure(kind: str, clients_n: int, messages: int, rate: float) -> dict[str, float]:
    server = Child("serve")
    client = None
    try:
        port = server.read()["port"]
        client = Child("clients", kind, f"ws://127.0.0.1:{port}", str(clients_n))
        client.read()  # ready
        client.send({"cmd": "expect", "count": messages, "timeout_s": 300})
        client.read()  # armed
        server.send({"cmd": "cpu"})
        before = server.read()
        started = time.time()
        server.send({"cmd": "burst", "count": messages, "rate": rate})
        server.read()
        result = client.read()
        server.send({"cmd": "cpu"})
        after = server.read()
        cpu_s = after["cpu_s"] - before["cpu_s"]
        if result["done"] is None:
            raise RuntimeError(f"{kind}: only {result['received']} deliveries arrived")
        deliveries = clients_n * messages
        wall_s = result["done"] - started
        return {
            "deliveries": deliveries,
            "wall_s": wall_s,
            "per_s": deliveries / wall_s,
            "cpu_us": cpu_s * 1e6 / deliveries,
            "per_cpu_s": deliveries / cpu_s,
            "user_us": (after["user_s"] - before["user_s"]) * 1e6 / deliveries,
            "system_us": (after["system_s"] - before["system_s"]) * 1e6 / deliveries,
        }
    finally:
        if client is not None:
            client.stop()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--rate", type=float, default=100.0, help="messages per second; 0 = as fast as possible"
    )
    parser.add_argument(
        "--kinds", default="native,socket.io", help=f"comma-separated, of {', '.join(KINDS)}"
    )
    args = parser.parse_args()
    order = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    if not order or any(kind not in KINDS for kind in order):
        parser.error(f"--kinds: a comma-separated list of {', '.join(KINDS)}")
    compare(order, args.clients, args.messages, args.rate, args.rounds, print_runs=True)


def compare(
    order: list[str], clients: int, messages: int, rate: float, rounds: int, print_runs: bool
) -> dict[str, dict[str, float]]:
    """Every kind `rounds` times, interleaved; the median of each, and ratios to the first."""
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in order}
    for round_ in range(rounds):
        for kind in order if round_ % 2 == 0 else reversed(order):
            result = measure(kind, clients, messages, rate)
            results[kind].append(result)
            if not print_runs:
                continue
            print(
                f"{kind:9}  {result['per_s']:>10,.0f} deliveries/s  "
                f"{result['cpu_us']:6.2f} pod CPU-µs/delivery  "
                f"(user {result['user_us']:.2f}, system {result['system_us']:.2f})  "
                f"({result['wall_s']:.2f} s)",
                flush=True,
            )
    print(f"\n{clients} clients on one channel, {messages} messages, median of {rounds}:")
    summary: dict[str, dict[str, float]] = {}
    for kind, runs in results.items():
        summary[kind] = {
            key: statistics.median(r[key] for r in runs)
            for key in ("per_s", "cpu_us", "per_cpu_s", "user_us", "system_us")
        }
        summary[kind]["runs"] = len(runs)
        s = summary[kind]
        print(
            f"  {kind:9}  {s['per_s']:>10,.0f} deliveries/s   {s['cpu_us']:6.2f} pod CPU-µs per "
            f"delivery   {s['per_cpu_s']:>10,.0f} deliveries per pod CPU-second"
        )
    first = order[0]
    for kind in order[1:]:
        ratio = summary[kind]["cpu_us"] / summary[first]["cpu_us"]
        summary[kind]["ratio"] = ratio
        print(f"  {kind} / {first} pod CPU per delivery: {ratio:.2f}x")
    return summary


def _raise_nofile_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("serve", "clients"):
        _raise_nofile_limit()
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        import uvloop

        uvloop.run(serve())
    elif len(sys.argv) > 1 and sys.argv[1] == "clients":
        import uvloop

        uvloop.run(clients(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    else:
        main()
